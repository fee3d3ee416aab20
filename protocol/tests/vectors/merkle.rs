//! transparency-dev/merkle testdata: every happy path verifies, every `wantErr` case is rejected.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use countersign_protocol::merkle::{verify_consistency, verify_inclusion};
use serde_json::Value;

use super::{json_files, read_json, vectors};

fn b64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap_or("")).unwrap()
}

fn proof(v: &Value) -> Vec<Vec<u8>> {
    // `null` and `[]` both mean "no hashes" in this format.
    v.as_array()
        .map(|a| a.iter().map(b64).collect())
        .unwrap_or_default()
}

fn run(sub: &str, check: impl Fn(&Value) -> bool) {
    let Some(dir) = vectors(sub) else { return };
    let files = json_files(&dir);
    assert!(!files.is_empty(), "no vectors in {}", dir.display());
    let (mut ok, mut rejected) = (0, 0);
    for f in &files {
        let v = read_json(f);
        let want_err = v["wantErr"].as_bool().unwrap();
        let verified = check(&v);
        assert_eq!(
            verified,
            !want_err,
            "{}: {}",
            f.display(),
            v["desc"].as_str().unwrap_or("")
        );
        if verified { ok += 1 } else { rejected += 1 }
    }
    println!(
        "{sub}: {} files passed ({ok} verified, {rejected} rejected as expected)",
        files.len()
    );
}

#[test]
fn inclusion_vectors() {
    run("merkle/inclusion", |v| {
        verify_inclusion(
            &b64(&v["leafHash"]),
            v["leafIdx"].as_u64().unwrap(),
            v["treeSize"].as_u64().unwrap(),
            &proof(&v["proof"]),
            &b64(&v["root"]),
        )
        .is_ok()
    });
}

#[test]
fn consistency_vectors() {
    run("merkle/consistency", |v| {
        verify_consistency(
            v["size1"].as_u64().unwrap(),
            v["size2"].as_u64().unwrap(),
            &b64(&v["root1"]),
            &b64(&v["root2"]),
            &proof(&v["proof"]),
        )
        .is_ok()
    });
}
