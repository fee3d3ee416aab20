//! Wycheproof vectors for the primitives under the SFS channel and its signatures, through
//! the crates the SFS (and `snow`, and the key vault) build on: ECDSA P-256/SHA-256 with DER
//! signatures (`p256::ecdsa`), ECDH P-256 (`p256::ecdh`), HKDF-SHA256 (`hkdf`) and AES-GCM
//! with 128- and 256-bit keys and 12-byte IVs (`aes-gcm`). A pass means these crates agree
//! with an implementation somebody else wrote, on the edge cases somebody else collected.
//!
//! The folder is `$COUNTERSIGN_TESTVECTORS/wycheproof` or `<crate>/../../shared/testvectors/
//! wycheproof`; when a file is missing the test prints `skipped: <path> not found` and passes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use serde_json::Value;

fn vectors(file: &str) -> Option<Value> {
    let root = std::env::var_os("COUNTERSIGN_TESTVECTORS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testvectors"),
        PathBuf::from,
    );
    let path = root.join("wycheproof").join(file);
    if !path.exists() {
        println!("skipped: {} not found", path.display());
        return None;
    }
    Some(serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap())
}

fn hex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

/// Each test of each group, with its group.
fn cases(doc: &Value) -> impl Iterator<Item = (&Value, &Value)> {
    doc["testGroups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["tests"].as_array().unwrap().iter().map(move |t| (g, t)))
}

#[derive(Default, Debug)]
struct Tally {
    valid: usize,
    invalid: usize,
    acceptable: usize,
}

impl Tally {
    /// Checks one outcome against the vector's verdict.
    fn check(&mut self, test: &Value, ok: bool) {
        let id = &test["tcId"];
        match test["result"].as_str().unwrap() {
            "valid" => {
                assert!(ok, "tcId {id} ({}) should pass", test["comment"]);
                self.valid += 1;
            }
            "invalid" => {
                assert!(!ok, "tcId {id} ({}) should fail", test["comment"]);
                self.invalid += 1;
            }
            _ => self.acceptable += 1,
        }
    }
}

#[test]
fn ecdsa_p256_sha256_der() {
    use p256::ecdsa::signature::Verifier as _;
    use p256::ecdsa::{Signature, VerifyingKey};
    let Some(doc) = vectors("ecdsa_secp256r1_sha256_test.json") else {
        return;
    };
    let mut tally = Tally::default();
    for (group, test) in cases(&doc) {
        assert_eq!(group["sha"], "SHA-256");
        let key = VerifyingKey::from_sec1_bytes(&hex(&group["publicKey"]["uncompressed"])).unwrap();
        let ok = Signature::from_der(&hex(&test["sig"]))
            .is_ok_and(|sig| key.verify(&hex(&test["msg"]), &sig).is_ok());
        tally.check(test, ok);
    }
    println!("wycheproof ecdsa der: {tally:?}");
    assert!(tally.valid > 0 && tally.invalid > 0);
}

#[test]
fn ecdh_p256() {
    use p256::pkcs8::DecodePublicKey as _;
    let Some(doc) = vectors("ecdh_secp256r1_test.json") else {
        return;
    };
    let mut tally = Tally::default();
    for (group, test) in cases(&doc) {
        assert_eq!(group["curve"], "secp256r1");
        let private = hex(&test["private"]);
        // Big-endian integers: strip sign bytes, pad to 32.
        let trimmed: Vec<u8> = private.iter().copied().skip_while(|&b| b == 0).collect();
        let mut scalar = [0u8; 32];
        let ok = trimmed.len() <= 32 && {
            scalar[32 - trimmed.len()..].copy_from_slice(&trimmed);
            let secret = p256::SecretKey::from_slice(&scalar).unwrap();
            p256::PublicKey::from_public_key_der(&hex(&test["public"])).is_ok_and(|public| {
                let shared =
                    p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
                shared.raw_secret_bytes().as_slice() == hex(&test["shared"]).as_slice()
            })
        };
        tally.check(test, ok);
    }
    println!("wycheproof ecdh: {tally:?}");
    assert!(tally.valid > 0 && tally.invalid > 0);
}

#[test]
fn hkdf_sha256() {
    let Some(doc) = vectors("hkdf_sha256_test.json") else {
        return;
    };
    let mut tally = Tally::default();
    for (_, test) in cases(&doc) {
        let salt = hex(&test["salt"]);
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &hex(&test["ikm"]));
        let mut okm = vec![0u8; usize::try_from(test["size"].as_u64().unwrap()).unwrap()];
        let ok = hk.expand(&hex(&test["info"]), &mut okm).is_ok() && okm == hex(&test["okm"]);
        tally.check(test, ok);
    }
    println!("wycheproof hkdf: {tally:?}");
    assert!(tally.valid > 0);
}

#[test]
fn aes_gcm_128_and_256_with_12_byte_ivs() {
    use aes_gcm::aead::consts::U12;
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{AeadCore, Aes128Gcm, Aes256Gcm, Nonce};

    fn seal_open<C: KeyInit + Aead + AeadCore<NonceSize = U12>>(
        key: &[u8],
        iv: [u8; 12],
        aad: &[u8],
        msg: &[u8],
        sealed: &[u8],
    ) -> (Vec<u8>, Option<Vec<u8>>) {
        let cipher = C::new_from_slice(key).unwrap();
        let nonce: Nonce<U12> = Nonce::from(iv);
        let ours = cipher.encrypt(&nonce, Payload { msg, aad }).unwrap();
        let opened = cipher.decrypt(&nonce, Payload { msg: sealed, aad }).ok();
        (ours, opened)
    }

    let Some(doc) = vectors("aes_gcm_test.json") else {
        return;
    };
    let mut tally = Tally::default();
    let mut skipped = 0;
    for (group, test) in cases(&doc) {
        let (key_size, iv_size, tag_size) = (
            group["keySize"].as_u64().unwrap(),
            group["ivSize"].as_u64().unwrap(),
            group["tagSize"].as_u64().unwrap(),
        );
        if !matches!(key_size, 128 | 256) || iv_size != 96 || tag_size != 128 {
            skipped += 1;
            continue;
        }
        let iv: [u8; 12] = hex(&test["iv"]).try_into().unwrap();
        let (key, aad, msg) = (hex(&test["key"]), hex(&test["aad"]), hex(&test["msg"]));
        let mut sealed = hex(&test["ct"]);
        sealed.extend(hex(&test["tag"]));
        let (ours, opened) = if key_size == 128 {
            seal_open::<Aes128Gcm>(&key, iv, &aad, &msg, &sealed)
        } else {
            seal_open::<Aes256Gcm>(&key, iv, &aad, &msg, &sealed)
        };
        let ok = opened.as_deref() == Some(msg.as_slice());
        if test["result"] == "valid" {
            assert_eq!(ours, sealed, "tcId {}", test["tcId"]);
        }
        tally.check(test, ok);
    }
    println!("wycheproof aes-gcm: {tally:?}, {skipped} cases of other sizes skipped");
    assert!(tally.valid > 0 && tally.invalid > 0);
}
