//! cose-wg/Examples: sign1-tests and ecdsa-examples. ECDSA is randomised there, so (as the
//! README says) the to-be-signed bytes are compared and signatures verified, never compared.
//! countersign's one-encoding rule refuses every ES256 message here (each carries a `kid` in
//! its unprotected header, or is untagged): their Sig_structures and signatures are checked
//! through the raw primitive, and the policy's refusal reason is asserted.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use coset::{CoseSign, TaggedCborSerializable as _};
use countersign_protocol::cose::{
    ContentType, CoseError, ProtectedFields, sign1_es256, to_be_signed, verify_es256,
    verify_sign1_es256,
};
use p256::ecdsa::{SigningKey, VerifyingKey};
use serde_json::Value;

use super::{json_files, read_json, vectors};

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

/// The JWK in the vector (`x`, `y`, `d` in base64url), if it is a P-256 key.
fn p256_key(jwk: &Value) -> Option<(SigningKey, VerifyingKey)> {
    if jwk["crv"] != "P-256" {
        return None;
    }
    let b = |k: &str| URL_SAFE_NO_PAD.decode(jwk[k].as_str().unwrap()).unwrap();
    let mut sec1 = vec![0x04];
    sec1.extend(b("x"));
    sec1.extend(b("y"));
    let vk = VerifyingKey::from_sec1_bytes(&sec1).unwrap();
    let sk = SigningKey::from_slice(&b("d")).unwrap();
    assert_eq!(sk.verifying_key(), &vk, "d does not match x, y");
    Some((sk, vk))
}

/// The protected fields our signer would write for the vector's protected header, if it only
/// uses what we write (alg ES256, ctyp, kid).
fn our_fields(protected: &Value) -> Option<ProtectedFields> {
    let mut fields = ProtectedFields::default();
    for (k, v) in protected.as_object()? {
        match (k.as_str(), v) {
            ("alg", v) if v == "ES256" => {}
            ("ctyp", Value::Number(n)) => {
                fields.content_type = Some(ContentType::CoapFormat(n.as_i64()?));
            }
            ("ctyp", Value::String(s)) => {
                fields.content_type = Some(ContentType::MediaType(s.clone()));
            }
            ("kid", Value::String(s)) => fields.key_id = Some(s.as_bytes().to_vec()),
            _ => return None,
        }
    }
    Some(fields)
}

#[test]
fn cose_wg_examples() {
    let Some(dir) = vectors("cose") else { return };
    let files = json_files(&dir);
    assert!(!files.is_empty());
    let (mut passed, mut skipped) = (0, 0);
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let v = read_json(f);
        let title = v["title"].as_str().unwrap_or("").to_owned();
        let cbor = unhex(&v["output"]["cbor"]);
        let input = &v["input"];
        let outcome = if let Some(sign0) = input.get("sign0") {
            check_sign1(&name, sign0, &v, &cbor, input)
        } else {
            check_sign(&name, &input["sign"], &v, &cbor)
        };
        match outcome {
            Ok(()) => passed += 1,
            Err(reason) => {
                println!("skipped {name} ({title}): {reason}");
                skipped += 1;
            }
        }
    }
    println!(
        "cose: {passed} files passed, {skipped} skipped, of {}",
        files.len()
    );
    assert!(passed >= 7, "only {passed} COSE vectors exercised");
}

fn got_malformed<T>(r: &Result<T, CoseError>) -> bool {
    matches!(r, Err(CoseError::Malformed(_)))
}

/// `Ok` when the vector was checked and agreed; `Err(reason)` when it was skipped.
fn check_sign1(
    name: &str,
    sign0: &Value,
    v: &Value,
    cbor: &[u8],
    input: &Value,
) -> Result<(), String> {
    let Some((sk, vk)) = p256_key(&sign0["key"]) else {
        // Still must not be accepted as ES256 under some P-256 key.
        let any = SigningKey::from_slice(&[1; 32]).unwrap();
        assert!(
            matches!(
                verify_sign1_es256(cbor, any.verifying_key(), b""),
                Err(CoseError::UnsupportedAlgorithm(_))
            ),
            "{name}"
        );
        return Err(format!("{} key, not P-256", sign0["key"]["crv"]));
    };
    let aad = sign0
        .get("external")
        .map(|e| hex::decode(e.as_str().unwrap()).unwrap())
        .unwrap_or_default();
    let result = verify_sign1_es256(cbor, &vk, &aad);
    let fails = input.get("failures").is_some() && name.contains("fail");

    // Every vector's cryptography is checked through the raw primitive on its Sig_structure,
    // whatever our encoding policy then says about the message.
    let msg = lenient(cbor);
    let raw = to_be_signed(cbor, &aad)
        .ok()
        .zip(msg.as_ref())
        .map(|(tbs, m)| verify_es256(&vk, &tbs, &m.signature));

    if fails {
        // Rejected, and for the reason the vector is about.
        let want = match &input["failures"] {
            f if f.get("ChangeCBORTag").is_some() => "WrongTag",
            // coset already refuses an unregistered alg number (-999) while decoding.
            f if f.get("ChangeAttr").is_some() && got_malformed(&result) => "Malformed",
            f if f.get("ChangeAttr").is_some() => "UnsupportedAlgorithm",
            _ => "BadSignature",
        };
        let got = format!("{result:?}");
        if want == "BadSignature" && result == Err(CoseError::UnprotectedHeader) {
            // Our one-encoding rule (an empty unprotected header; these carry a kid) refuses it
            // first; the vector's own point, a signature that does not verify, still holds.
            assert!(matches!(raw, Some(Err(_))), "{name}: {raw:?}");
            println!("{name}: bad signature confirmed; refused first for its unprotected kid");
            return Ok(());
        }
        assert!(
            got.starts_with(&format!("Err({want}")),
            "{name}: {got}, want {want}"
        );
        return Ok(());
    }
    if sign0["alg"] != "ES256" {
        assert!(
            matches!(result, Err(CoseError::UnsupportedAlgorithm(_))),
            "{name}: {result:?}"
        );
        return Err(format!(
            "alg {} on a P-256 key, rejected as not ES256",
            sign0["alg"]
        ));
    }

    let want_tbs = unhex(&v["intermediates"]["ToBeSign_hex"]);
    assert_eq!(
        to_be_signed(cbor, &aad).unwrap(),
        want_tbs,
        "{name}: Sig_structure"
    );
    assert_eq!(raw, Some(Ok(())), "{name}: the vector's signature verifies");
    let msg = msg.unwrap();
    let payload = msg.payload.clone().unwrap();
    assert_eq!(payload, input["plaintext"].as_str().unwrap().as_bytes());

    // The policy of countersign::cose (alg protected only; tag 18; nothing unprotected),
    // applied to a message whose cryptography is sound.
    let unprotected = sign0["unprotected"].as_object().map_or(0, |m| m.len());
    let policy = if sign0["unprotected"].get("alg").is_some() {
        Some(CoseError::UnprotectedAlgorithm)
    } else if cbor.first() != Some(&0xd2) {
        Some(CoseError::Untagged)
    } else if unprotected > 0 {
        Some(CoseError::UnprotectedHeader)
    } else {
        None
    };
    match policy {
        Some(refusal) => {
            assert_eq!(result, Err(refusal.clone()), "{name}");
            println!("{name}: Sig_structure and signature agree; refused by policy ({refusal})");
        }
        None => {
            let verified = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(verified.payload, payload);
        }
    }

    // Our signer, given the same header and payload, builds the same Sig_structure, and what it
    // writes is accepted.
    if let Some(fields) = our_fields(&sign0["protected"]) {
        let ours = sign1_es256(&sk, &fields, payload.as_slice(), &aad).unwrap();
        assert_eq!(
            to_be_signed(&ours, &aad).unwrap(),
            want_tbs,
            "{name}: our Sig_structure"
        );
        let verified = verify_sign1_es256(&ours, &vk, &aad).unwrap();
        assert_eq!(verified.protected, fields, "{name}");
    }
    Ok(())
}

/// The message read without countersign's policy (tagged or not), to reach its signature.
fn lenient(cbor: &[u8]) -> Option<coset::CoseSign1> {
    use coset::CborSerializable as _;
    coset::CoseSign1::from_tagged_slice(cbor)
        .or_else(|_| coset::CoseSign1::from_slice(cbor))
        .ok()
}

/// COSE_Sign (multi-signer, tag 98) examples: outside what countersign uses, but an ES256
/// signer's signature goes through the same raw verification.
fn check_sign(name: &str, sign: &Value, v: &Value, cbor: &[u8]) -> Result<(), String> {
    let signer = &sign["signers"][0];
    let alg = &signer["protected"]["alg"];
    let Some((_, vk)) = p256_key(&signer["key"]).filter(|_| alg == "ES256") else {
        return Err(format!(
            "COSE_Sign with {alg} on {}, not ES256",
            signer["key"]["crv"]
        ));
    };
    let msg = CoseSign::from_tagged_slice(cbor).unwrap();
    let sig = &msg.signatures[0];
    let tbs = msg.tbs_data(b"", sig);
    assert_eq!(
        tbs,
        unhex(&v["intermediates"]["signers"][0]["ToBeSign_hex"]),
        "{name}"
    );
    verify_es256(&vk, &tbs, &sig.signature).unwrap();
    // Not a COSE_Sign1, so the Sign1 verifier must refuse it.
    assert!(verify_sign1_es256(cbor, &vk, b"").is_err(), "{name}");
    Ok(())
}
