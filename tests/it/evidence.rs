//! The evidence bundle end to end over real sockets: the business API creates a payment, the
//! phone (mobile SDK, PIN at the SFS) approves it, the API serves the bundle once a signed
//! checkpoint covers the signature, and the `countersign verify` binary checks it offline with
//! the two public keys. Then every part of the bundle is tampered with in turn, and each is
//! refused for its own reason; a signature carried onto another transaction is refused too.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{Sdk, SecondFactor};
use countersign_protocol::checkpoint::CheckpointError;
use countersign_protocol::cose::noncanonical;
use countersign_protocol::evidence::{Evidence, EvidenceError, verify_evidence};
use p256::ecdsa::VerifyingKey;
use reqwest::{Method, StatusCode};

use crate::api::{Api, checkpoint_covering};
use crate::binary::binary;
use crate::second_factor::{phone, pin_tenant};
use crate::transactions_device::{PIN, create, enrol_with_pin, payment};

/// Signs transaction `id` on the phone with a fresh PIN.
async fn approve(phone: &Sdk, account: &str, id: &str) {
    let shown = phone.get_transaction(account, id).await.unwrap();
    phone
        .sign_transaction(
            account,
            &shown,
            SecondFactor::pin(PIN),
            BTreeMap::from([("model".to_owned(), "Test phone".to_owned())]),
            None,
        )
        .await
        .unwrap();
}

/// The log position of the transaction's `transaction.signed`.
async fn signed_position(api: &Api, server: &str, id: &str) -> u64 {
    let stream = format!("transaction-{server}-{id}");
    let all = api
        .running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap();
    all.iter()
        .find(|e| e.stream == stream && e.event_type == "transaction.signed")
        .map(|e| e.position)
        .unwrap()
}

/// The bundle as the API serves it, once a checkpoint covers the signature.
async fn evidence(api: &Api, server: &str, token: &str, id: &str) -> Vec<u8> {
    checkpoint_covering(api, token, signed_position(api, server, id).await).await;
    let response = api
        .http
        .get(api.url(&format!("/v1/servers/{server}/transactions/{id}/evidence")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/cbor"
    );
    response.bytes().await.unwrap().to_vec()
}

/// A public key a deployment publishes, as hex.
async fn published_key(api: &Api, token: &str, path: &str, field: &str) -> String {
    let (status, body) = api.call(Method::GET, path, Some(token), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body[field].as_str().unwrap().to_owned()
}

fn key(hex_key: &str) -> VerifyingKey {
    VerifyingKey::from_sec1_bytes(&hex::decode(hex_key).unwrap()).unwrap()
}

fn flip_last(bytes: &mut [u8]) {
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
}

fn run_verify(
    dir: &std::path::Path,
    bundle: &[u8],
    audit: &str,
    sfs: &str,
) -> std::process::Output {
    run_verify_with(dir, bundle, audit, sfs, &[])
}

fn run_verify_with(
    dir: &std::path::Path,
    bundle: &[u8],
    audit: &str,
    sfs: &str,
    extra: &[&str],
) -> std::process::Output {
    let file = dir.join("evidence.cbor");
    std::fs::write(&file, bundle).unwrap();
    Command::new(binary())
        .arg("verify")
        .arg(&file)
        .args(["--audit-key", audit, "--sfs-key", sfs])
        .args(extra)
        .output()
        .unwrap()
}

async fn a_payment_approved_with_a_pin_is_proven_offline(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "ines").await;
    let phone = phone(&api).await;
    let clock = api.clock.clone();
    phone.set_clock(Arc::new(move || clock.now_ms())).unwrap();
    let account = enrol_with_pin(&api, &phone, &server, &token, "ines").await;

    let id = create(&api, &server, &token, payment("ines", 300)).await;
    approve(&phone, &account, &id).await;
    let bundle = evidence(&api, &server, &token, &id).await;

    // The JSON rendering is for people: same content, decoded.
    let (status, json) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/transactions/{id}/evidence?format=json"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["transaction"]["transaction_id"], id.as_str());
    assert_eq!(json["account"]["account_id"], account.as_str());

    // Offline, with the binary and the two published keys.
    let audit = published_key(&api, &token, "/v1/audit/key", "public_key").await;
    let sfs = published_key(&api, &token, "/v1/sfs/key", "attestation_public_key").await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_verify(dir.path(), &bundle, &audit, &sfs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("VALID"), "{stdout}");
    assert!(
        stdout.contains(&id) && stdout.contains(&account),
        "{stdout}"
    );
    assert!(stdout.contains("PIN"), "{stdout}");

    // One byte changed anywhere that matters: refused, each for its own reason.
    let (audit_key, sfs_key) = (key(&audit), key(&sfs));
    let verify =
        |b: &Evidence| verify_evidence(&b.to_cbor().unwrap(), &audit_key, &[sfs_key], None);
    let valid = Evidence::from_cbor(&bundle).unwrap();
    verify(&valid).unwrap();
    let tampered = |change: &dyn Fn(&mut Evidence)| {
        let mut b = valid.clone();
        change(&mut b);
        verify(&b).unwrap_err()
    };
    assert_eq!(
        tampered(&|b| b.transaction.data[0] ^= 0x01),
        EvidenceError::DataMismatch
    );
    assert_eq!(
        tampered(&|b| b.transaction.text = b.transaction.text.replace("100.00", "900.00")),
        EvidenceError::TextMismatch
    );
    assert_eq!(
        tampered(&|b| flip_last(&mut b.device_signature)),
        EvidenceError::BadDeviceSignature
    );
    assert!(matches!(
        tampered(&|b| flip_last(&mut b.attestation)),
        EvidenceError::Attestation(_)
    ));
    assert!(matches!(
        tampered(&|b| b.inclusion_proof[0].0[0] ^= 0x01),
        EvidenceError::SignedEventNotIncluded(_)
    ));
    assert!(matches!(
        tampered(&|b| b.account.enrolment_proof[0].0[0] ^= 0x01),
        EvidenceError::EnrolmentNotIncluded(_)
    ));
    assert!(matches!(
        tampered(&|b| flip_last(&mut b.checkpoint)),
        EvidenceError::Checkpoint(_)
    ));
    assert!(matches!(
        tampered(&|b| flip_last(&mut b.signed_event)),
        EvidenceError::SignedEventNotIncluded(_)
    ));
    assert!(matches!(
        tampered(&|b| b.transaction.content_type = "text/plain".into()),
        EvidenceError::SignedEvent(_)
    ));
    assert!(matches!(
        tampered(&|b| b.transaction.expires_at_ms += 1),
        EvidenceError::SignedEvent(_)
    ));
    // The wrong keys: another audit key, an SFS the verifier does not trust.
    let stranger = key(&crate::second_factor::TestSfs::new(7).public_hex());
    assert!(matches!(
        verify_evidence(&bundle, &stranger, &[sfs_key], None),
        Err(EvidenceError::Checkpoint(_))
    ));
    assert!(matches!(
        verify_evidence(&bundle, &audit_key, &[stranger], None),
        Err(EvidenceError::Attestation(_))
    ));
    // The binary says so too, with the reason, and exits 1.
    let mut forged = valid.clone();
    forged.transaction.data[0] ^= 0x01;
    let out = run_verify(dir.path(), &forged.to_cbor().unwrap(), &audit, &sfs);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NOT VALID") && stderr.contains("data"),
        "{stderr}"
    );

    // Issue 19 item 10: the served checkpoint, re-encoded (untagged, `d812`, long or indefinite
    // heads, an unprotected kid, content type or 15 kB blob: its signature still holds), makes
    // another file that verified before; each is refused, by the binary too.
    let signed_head = verify(&valid).unwrap().checkpoint;
    for v in noncanonical::variants(&valid.checkpoint).unwrap() {
        let mut b = valid.clone();
        b.checkpoint = v.bytes;
        assert_eq!(
            verify(&b).unwrap_err(),
            EvidenceError::Checkpoint(CheckpointError::Cose(v.refused_with.clone())),
            "{}",
            v.name
        );
        let out = run_verify(dir.path(), &b.to_cbor().unwrap(), &audit, &sfs);
        assert_eq!(out.status.code(), Some(1), "{}", v.name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("NOT VALID") && stderr.contains(&v.refused_with.to_string()),
            "{}: {stderr}",
            v.name
        );
    }
    // `--at` judges the checkpoint's date at a given time, `--no-clock` at none.
    let before = (signed_head.timestamp_ms - 5_001).to_string();
    let out = run_verify_with(dir.path(), &bundle, &audit, &sfs, &["--at", &before]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dated in the future"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at_skew = (signed_head.timestamp_ms - 5_000).to_string();
    for extra in [&["--at", at_skew.as_str()][..], &["--no-clock"]] {
        let out = run_verify_with(dir.path(), &bundle, &audit, &sfs, extra);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Issue 19 item 11: the binary names the app instance the factor was proven on, the
    // enrolled one.
    let app_instance = hex::encode(verify(&valid).unwrap().app_instance);
    assert!(stdout.contains(&app_instance), "{stdout}");

    // A signature and attestation carried onto another transaction of the same user, with the
    // same data and text: refused.
    let second = create(&api, &server, &token, payment("ines", 300)).await;
    approve(&phone, &account, &second).await;
    let other = Evidence::from_cbor(&evidence(&api, &server, &token, &second).await).unwrap();
    verify(&other).unwrap();
    let mut replayed = other.clone();
    replayed.device_signature = valid.device_signature.clone();
    replayed.attestation = valid.attestation.clone();
    assert_eq!(
        verify(&replayed).unwrap_err(),
        EvidenceError::TransactionMismatch
    );
    // Nor does a bundle prove a transaction that is not signed.
    let pending = create(&api, &server, &token, payment("ines", 300)).await;
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/transactions/{pending}/evidence"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    api.stop().await;
}

countersign_eventstore::on_both_backends!(a_payment_approved_with_a_pin_is_proven_offline);
