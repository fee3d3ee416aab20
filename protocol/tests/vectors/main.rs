//! Public conformance vectors from ../shared/testvectors (see its README): transparency-dev's
//! Merkle proofs, cose-wg's COSE_Sign1 examples and Wycheproof's P-256 ECDSA (P1363) cases. A
//! test that passes them agrees with an implementation somebody else wrote.
//!
//! The folder is `$COUNTERSIGN_TESTVECTORS` or `<crate>/../../shared/testvectors`; when it is
//! missing each test says `skipped: <path> not found` and passes, so the crate still tests on a
//! machine without the shared folder.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]
#![allow(clippy::indexing_slicing)]

mod cose;
mod merkle;
mod wycheproof;

use std::path::{Path, PathBuf};

/// `<testvectors>/<sub>` if it exists; otherwise prints the skip line and returns `None`.
fn vectors(sub: &str) -> Option<PathBuf> {
    let root = std::env::var_os("COUNTERSIGN_TESTVECTORS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testvectors"),
        PathBuf::from,
    );
    let dir = root.join(sub);
    if dir.exists() {
        Some(dir)
    } else {
        println!("skipped: {} not found", dir.display());
        None
    }
}

/// Every `*.json` file under `dir`, recursively, sorted.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "json") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
