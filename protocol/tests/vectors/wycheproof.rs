//! Wycheproof ECDSA P-256 / SHA-256 with IEEE P1363 (raw `r ‖ s`) signatures, through the same
//! verification primitive the COSE code uses: `valid` must verify, `invalid` must not,
//! `acceptable` may go either way.

use countersign_protocol::cose::verify_es256;
use p256::ecdsa::VerifyingKey;

use super::{read_json, vectors};

#[test]
fn ecdsa_p256_sha256_p1363() {
    let Some(dir) = vectors("wycheproof") else {
        return;
    };
    let v = read_json(&dir.join("ecdsa_secp256r1_sha256_p1363_test.json"));
    let (mut valid, mut invalid, mut acceptable) = (0, 0, 0);
    for group in v["testGroups"].as_array().unwrap() {
        assert_eq!(group["sha"], "SHA-256");
        let key = hex::decode(group["publicKey"]["uncompressed"].as_str().unwrap()).unwrap();
        let vk = VerifyingKey::from_sec1_bytes(&key).unwrap();
        for t in group["tests"].as_array().unwrap() {
            let msg = hex::decode(t["msg"].as_str().unwrap()).unwrap();
            let sig = hex::decode(t["sig"].as_str().unwrap()).unwrap();
            let ok = verify_es256(&vk, &msg, &sig).is_ok();
            let id = &t["tcId"];
            match t["result"].as_str().unwrap() {
                "valid" => {
                    assert!(ok, "tcId {id} ({}) must verify", t["comment"]);
                    valid += 1;
                }
                "invalid" => {
                    assert!(!ok, "tcId {id} ({}) must fail", t["comment"]);
                    invalid += 1;
                }
                _ => acceptable += 1,
            }
        }
    }
    println!(
        "wycheproof p1363: {valid} valid verified, {invalid} invalid rejected, {acceptable} acceptable"
    );
    assert_eq!(
        valid + invalid + acceptable,
        v["numberOfTests"].as_u64().unwrap()
    );
}
