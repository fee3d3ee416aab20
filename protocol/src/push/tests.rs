#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    <[u8; 32]>::try_from(h(s)).unwrap()
}

// RFC 9180, Appendix A.3: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM. The values are
// the RFC's, copied from its source (draft-irtf-cfrg-hpke, the auth48 text that became RFC
// 9180), and agree with the copies in other HPKE implementations' tests. Shared by A.3.1 and
// A.3.3: info, and the plaintext and AAD of encryption sequence number 0.
const INFO_A3: &str = "4f6465206f6e2061204772656369616e2055726e";
const PT_A3: &str = "4265617574792069732074727574682c20747275746820626561757479";
const AAD_A3_SEQ0: &str = "436f756e742d30";

/// RFC 9180 A.3.1 (Base mode) through the crate directly: proves the crate's suite, key
/// derivation and key schedule are the RFC's.
#[test]
fn rfc9180_a_3_1_base_setup_and_encryption_0() {
    let ikm_e = h32("4270e54ffd08d79d5928020af4686d8f6b7d35dbe470265f1f5aa22816ce860e");
    let pk_em = "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4";
    let sk_em = "4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb";
    let ikm_r = h32("668b37171f1072f3cf12ea8a236a45df23fc13b82af3609ad1e354f6ef817550");
    let pk_rm = "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0";
    let sk_rm = "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2";
    let shared_secret = "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8";
    let ct0 = "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434";

    let (sk_e, pk_e) = generate_push_key(ikm_e);
    assert_eq!(hex::encode(sk_e), sk_em);
    assert_eq!(hex::encode(pk_e), pk_em);
    let (sk_r, pk_r) = generate_push_key(ikm_r);
    assert_eq!(hex::encode(sk_r), sk_rm);
    assert_eq!(hex::encode(&pk_r), pk_rm);

    let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(&pk_r).unwrap();
    let (ss, enc) = Kem::encap_with_rng(&recipient, None, &mut SeededRng::new(ikm_e)).unwrap();
    assert_eq!(hex::encode(ss.0), shared_secret);
    assert_eq!(hex::encode(enc.to_bytes()), pk_em);

    let (enc, mut ctx) = hpke::setup_sender_with_rng::<Aead, Kdf, Kem>(
        &OpModeS::Base,
        &recipient,
        &h(INFO_A3),
        &mut SeededRng::new(ikm_e),
    )
    .unwrap();
    assert_eq!(hex::encode(enc.to_bytes()), pk_em, "enc");
    assert_eq!(
        hex::encode(ctx.seal(&h(PT_A3), &h(AAD_A3_SEQ0)).unwrap()),
        ct0
    );
}

/// RFC 9180 A.3.3 (Auth mode, the mode pushes use) through this module's own seal and open:
/// proves the suite, the mode, and that `random` is `ikmE`.
#[test]
fn rfc9180_a_3_3_auth_setup_and_encryption_0() {
    let ikm_e = h32("798d82a8d9ea19dbc7f2c6dfa54e8a6706f7cdc119db0813dacf8440ab37c857");
    let pk_em = "042224f3ea800f7ec55c03f29fc9865f6ee27004f818fcbdc6dc68932c1e52e15b79e264a98f2c535ef06745f3d308624414153b22c7332bc1e691cb4af4d53454";
    let sk_em = "6b8de0873aed0c1b2d09b8c7ed54cbf24fdf1dfc7a47fa501f918810642d7b91";
    let ikm_r = h32("7bc93bde8890d1fb55220e7f3b0c107ae7e6eda35ca4040bb6651284bf0747ee");
    let pk_rm = "04423e363e1cd54ce7b7573110ac121399acbc9ed815fae03b72ffbd4c18b01836835c5a09513f28fc971b7266cfde2e96afe84bb0f266920e82c4f53b36e1a78d";
    let sk_rm = "d929ab4be2e59f6954d6bedd93e638f02d4046cef21115b00cdda2acb2a4440e";
    let ikm_s = h32("874baa0dcf93595a24a45a7f042e0d22d368747daaa7e19f80a802af19204ba8");
    let pk_sm = "04a817a0902bf28e036d66add5d544cc3a0457eab150f104285df1e293b5c10eef8651213e43d9cd9086c80b309df22cf37609f58c1127f7607e85f210b2804f73";
    let sk_sm = "1120ac99fb1fccc1e8230502d245719d1b217fe20505c7648795139d177f0de9";
    let shared_secret = "d4aea336439aadf68f9348880aa358086f1480e7c167b6ef15453ba69b94b44f";
    let exported_empty_32 = "837e49c3ff629250c8d80d3c3fb957725ed481e59e2feb57afd9fe9a8c7c4497";
    let ct0 = "82ffc8c44760db691a07c5627e5fc2c08e7a86979ee79b494a17cc3405446ac2bdb8f265db4a099ed3289ffe19";

    let (sk_e, pk_e) = generate_push_key(ikm_e);
    assert_eq!(
        (hex::encode(sk_e), hex::encode(pk_e)),
        (sk_em.into(), pk_em.into())
    );
    let (sk_r, pk_r) = generate_push_key(ikm_r);
    assert_eq!(
        (hex::encode(sk_r), hex::encode(&pk_r)),
        (sk_rm.into(), pk_rm.into())
    );
    let (sk_s, pk_s) = generate_push_key(ikm_s);
    assert_eq!(
        (hex::encode(sk_s), hex::encode(&pk_s)),
        (sk_sm.into(), pk_sm.into())
    );
    assert_eq!(push_public_key(&sk_s).unwrap(), pk_s);

    // AuthEncap's shared secret and the key schedule (an exported value).
    let sender = (
        <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk_s).unwrap(),
        <Kem as hpke::Kem>::PublicKey::from_bytes(&pk_s).unwrap(),
    );
    let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(&pk_r).unwrap();
    let (ss, _) = Kem::encap_with_rng(
        &recipient,
        Some((&sender.0, &sender.1)),
        &mut SeededRng::new(ikm_e),
    )
    .unwrap();
    assert_eq!(hex::encode(ss.0), shared_secret);
    let (_, ctx) = hpke::setup_sender_with_rng::<Aead, Kdf, Kem>(
        &OpModeS::Auth(sender),
        &recipient,
        &h(INFO_A3),
        &mut SeededRng::new(ikm_e),
    )
    .unwrap();
    let mut exported = [0u8; 32];
    ctx.export(b"", &mut exported).unwrap();
    assert_eq!(hex::encode(exported), exported_empty_32);

    // This module's seal and open, with the RFC's info and AAD instead of ours.
    let (enc, ct) =
        hpke_seal(&sk_s, &pk_r, &h(INFO_A3), &h(AAD_A3_SEQ0), &h(PT_A3), ikm_e).unwrap();
    assert_eq!(hex::encode(&enc), pk_em, "enc");
    assert_eq!(hex::encode(&ct), ct0, "ciphertext of sequence number 0");
    let pt = hpke_open(
        &sk_r,
        &pk_s,
        &h(INFO_A3),
        &h(AAD_A3_SEQ0),
        &h(pk_em),
        &h(ct0),
    )
    .unwrap();
    assert_eq!(pt, h(PT_A3));
    // Auth mode: the same ciphertext does not open as if another key had sent it.
    let (_, other_sender) = generate_push_key([9; 32]);
    assert_eq!(
        hpke_open(
            &sk_r,
            &other_sender,
            &h(INFO_A3),
            &h(AAD_A3_SEQ0),
            &h(pk_em),
            &h(ct0)
        ),
        Err(PushError::Decrypt)
    );
}

struct Fixture {
    server_secret: [u8; 32],
    server_public: Vec<u8>,
    account_secret: [u8; 32],
    account_public: Vec<u8>,
    target: PushTarget,
    message_id: [u8; 16],
    expires_at_ms: u64,
    message: PushMessage,
}

fn fixture() -> Fixture {
    let (server_secret, server_public) = generate_push_key([0x5e; 32]);
    let (account_secret, account_public) = generate_push_key([0xac; 32]);
    Fixture {
        server_secret,
        server_public,
        account_secret,
        account_public,
        target: PushTarget {
            server_id: [0x11; 16],
            account_id: [0x22; 16],
        },
        message_id: [0x33; 16],
        expires_at_ms: 1_700_000_060_000,
        message: PushMessage {
            body: PushBody::Login {
                hsid: Bytes([0x44; 32]),
            },
            sent_at_ms: 1_700_000_000_000,
        },
    }
}

fn sealed(f: &Fixture) -> Vec<u8> {
    seal(
        &f.server_secret,
        &f.account_public,
        &f.target,
        f.message_id,
        f.expires_at_ms,
        &f.message,
        [0xee; 32],
    )
    .unwrap()
}

#[test]
fn a_sealed_push_round_trips_and_reencodes_to_the_same_bytes() {
    let f = fixture();
    for body in [
        PushBody::Login {
            hsid: Bytes([1; 32]),
        },
        PushBody::Withdrawn {
            hsid: Bytes([2; 32]),
        },
        PushBody::LoggedOut {
            hsid: Bytes([3; 32]),
        },
        PushBody::AccountDeleted,
        PushBody::Transaction {
            transaction_id: Bytes([4; 16]),
        },
    ] {
        let message = PushMessage {
            body,
            sent_at_ms: 7,
        };
        let bytes = seal(
            &f.server_secret,
            &f.account_public,
            &f.target,
            f.message_id,
            f.expires_at_ms,
            &message,
            [0xee; 32],
        )
        .unwrap();
        assert!(bytes.len() < PUSH_INLINE_LIMIT);
        let envelope = decode_envelope(&bytes).unwrap();
        assert_eq!(envelope.encode(), bytes);
        assert_eq!(envelope.message_id, f.message_id);
        assert_eq!(envelope.expires_at_ms, f.expires_at_ms);
        assert_eq!(envelope.key_id, key_id(&f.account_public));
        assert_eq!(envelope.enc.len(), ENC_LEN);
        let opened = open(&f.account_secret, &f.server_public, &f.target, &envelope).unwrap();
        assert_eq!(opened, message);
    }
}

#[test]
fn fresh_randomness_gives_a_fresh_ephemeral_key() {
    let f = fixture();
    let a = decode_envelope(&sealed(&f)).unwrap();
    let b = seal(
        &f.server_secret,
        &f.account_public,
        &f.target,
        f.message_id,
        f.expires_at_ms,
        &f.message,
        [0xef; 32],
    )
    .unwrap();
    let b = decode_envelope(&b).unwrap();
    assert_ne!(a.enc, b.enc);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[test]
fn another_accounts_key_is_refused() {
    let f = fixture();
    let envelope = decode_envelope(&sealed(&f)).unwrap();
    let (other_secret, other_public) = generate_push_key([0xbd; 32]);
    assert_eq!(
        open(&other_secret, &f.server_public, &f.target, &envelope),
        Err(PushError::NotForThisKey)
    );
    // Even with the key id rewritten to the other key's, it does not decrypt.
    let forged = Envelope {
        key_id: key_id(&other_public),
        ..envelope
    };
    assert_eq!(
        open(&other_secret, &f.server_public, &f.target, &forged),
        Err(PushError::Decrypt)
    );
}

#[test]
fn every_aad_field_is_bound() {
    let f = fixture();
    let envelope = decode_envelope(&sealed(&f)).unwrap();
    let other_server = PushTarget {
        server_id: [0x12; 16],
        ..f.target
    };
    let other_account = PushTarget {
        account_id: [0x23; 16],
        ..f.target
    };
    for target in [other_server, other_account] {
        assert_eq!(
            open(&f.account_secret, &f.server_public, &target, &envelope),
            Err(PushError::Decrypt)
        );
    }
    let other_id = Envelope {
        message_id: [0x34; 16],
        ..envelope.clone()
    };
    let later = Envelope {
        expires_at_ms: f.expires_at_ms + 1,
        ..envelope.clone()
    };
    for e in [other_id, later] {
        assert_eq!(
            open(&f.account_secret, &f.server_public, &f.target, &e),
            Err(PushError::Decrypt)
        );
    }
    // The untouched envelope still opens: the refusals above are the changes'.
    assert!(open(&f.account_secret, &f.server_public, &f.target, &envelope).is_ok());
}

#[test]
fn a_push_from_another_sender_is_refused() {
    let f = fixture();
    let (impostor_secret, impostor_public) = generate_push_key([0x1f; 32]);
    let forged = seal(
        &impostor_secret,
        &f.account_public,
        &f.target,
        f.message_id,
        f.expires_at_ms,
        &f.message,
        [0xee; 32],
    )
    .unwrap();
    let envelope = decode_envelope(&forged).unwrap();
    assert_eq!(
        open(&f.account_secret, &f.server_public, &f.target, &envelope),
        Err(PushError::Decrypt)
    );
    assert!(open(&f.account_secret, &impostor_public, &f.target, &envelope).is_ok());
}

#[test]
fn truncated_extended_and_mutated_envelopes_are_refused() {
    let f = fixture();
    let bytes = sealed(&f);
    for len in 0..bytes.len() {
        assert!(
            matches!(decode_envelope(&bytes[..len]), Err(PushError::Malformed(_))),
            "truncated to {len}"
        );
    }
    let mut extended = bytes.clone();
    extended.push(0x00);
    assert!(matches!(
        decode_envelope(&extended),
        Err(PushError::Malformed(_))
    ));
    // Every single-bit flip: refused by the decoder or by open, never accepted.
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut m = bytes.clone();
            m[i] ^= 1 << bit;
            if let Ok(e) = decode_envelope(&m) {
                assert!(
                    open(&f.account_secret, &f.server_public, &f.target, &e).is_err(),
                    "byte {i} bit {bit} flipped still opened"
                );
            }
        }
    }
}

fn envelope_value(f: &Fixture) -> Vec<(Value, Value)> {
    match cbor::decode_value(&sealed(f)).unwrap() {
        Value::Map(entries) => entries,
        _ => unreachable!(),
    }
}

fn with_field(entries: &[(Value, Value)], name: &str, value: Option<Value>) -> Vec<u8> {
    let mut out: Vec<(Value, Value)> = entries
        .iter()
        .filter(|(k, _)| *k != Value::Text(name.into()))
        .cloned()
        .collect();
    if let Some(v) = value {
        out.push((Value::Text(name.into()), v));
    }
    cbor::encode_canonical(&Value::Map(out))
}

#[test]
fn versions_lengths_and_fields_are_checked() {
    let f = fixture();
    let entries = envelope_value(&f);
    assert_eq!(
        decode_envelope(&with_field(&entries, "v", Some(Value::Integer(2)))),
        Err(PushError::UnsupportedVersion(2))
    );
    let malformed = [
        with_field(&entries, "v", None),
        with_field(&entries, "v", Some(Value::Integer(-1))),
        with_field(&entries, "v", Some(Value::Text("1".into()))),
        with_field(&entries, "id", Some(Value::Bytes(vec![0x33; 15]))),
        with_field(&entries, "id", Some(Value::Bytes(vec![0x33; 17]))),
        with_field(&entries, "kid", Some(Value::Bytes(vec![0; 9]))),
        with_field(&entries, "enc", Some(Value::Bytes(vec![4; 64]))),
        with_field(&entries, "ct", Some(Value::Bytes(vec![0; 15]))),
        with_field(&entries, "exp", Some(Value::Integer(-5))),
        with_field(&entries, "exp", Some(Value::Text("soon".into()))),
        with_field(&entries, "exp", None),
        with_field(&entries, "extra", Some(Value::Null)),
        cbor::encode_canonical(&Value::Array(vec![])),
    ];
    for (i, bytes) in malformed.iter().enumerate() {
        assert!(
            matches!(decode_envelope(bytes), Err(PushError::Malformed(_))),
            "case {i}: {:?}",
            decode_envelope(bytes)
        );
    }
    // The same envelope with a needlessly long head for "v" (0x1801 for 1): not the one form.
    let bytes = sealed(&f);
    let at = bytes
        .windows(3)
        .position(|w| w == [0x61, b'v', 0x01])
        .unwrap();
    let mut long = bytes[..at + 2].to_vec();
    long.extend_from_slice(&[0x18, 0x01]);
    long.extend_from_slice(&bytes[at + 3..]);
    assert!(matches!(
        decode_envelope(&long),
        Err(PushError::Malformed(_))
    ));
    let huge = vec![0u8; MAX_ENVELOPE_BYTES + 1];
    assert_eq!(
        decode_envelope(&huge),
        Err(PushError::TooLarge(MAX_ENVELOPE_BYTES + 1))
    );
}

#[test]
fn invalid_keys_are_typed_errors() {
    let f = fixture();
    let seal_to = |recipient: &[u8], sender: &[u8; 32]| {
        seal(
            sender,
            recipient,
            &f.target,
            f.message_id,
            f.expires_at_ms,
            &f.message,
            [1; 32],
        )
    };
    let compressed = &f.account_public[..33];
    assert!(matches!(
        seal_to(compressed, &f.server_secret),
        Err(PushError::Key(_))
    ));
    let mut not_on_curve = f.account_public.clone();
    not_on_curve[64] ^= 1;
    assert!(matches!(
        seal_to(&not_on_curve, &f.server_secret),
        Err(PushError::Key(_))
    ));
    assert!(matches!(
        seal_to(&f.account_public, &[0; 32]),
        Err(PushError::Key(_))
    ));
    assert!(matches!(
        seal_to(&f.account_public, &[0xff; 32]),
        Err(PushError::Key(_))
    ));
    assert!(matches!(push_public_key(&[0; 32]), Err(PushError::Key(_))));
    let envelope = decode_envelope(&sealed(&f)).unwrap();
    // An enc that is not a point fails as a forgery would.
    let bad_enc = Envelope {
        enc: vec![4; 65],
        ..envelope
    };
    assert_eq!(
        open(&f.account_secret, &f.server_public, &f.target, &bad_enc),
        Err(PushError::Decrypt)
    );
}

#[test]
fn key_id_and_aad_are_the_documented_bytes() {
    let f = fixture();
    let digest = Sha256::digest(&f.account_public);
    assert_eq!(key_id(&f.account_public)[..], digest[..8]);
    let a = aad(&f.target, &f.message_id, 0x0102_0304_0506_0708);
    assert_eq!(a.len(), 19 + 16 + 16 + 16 + 8);
    assert_eq!(
        hex::encode(&a),
        format!(
            "{}{}{}{}0102030405060708",
            hex::encode(b"countersign-push-v1"),
            "11".repeat(16),
            "22".repeat(16),
            "33".repeat(16)
        )
    );
}

#[test]
fn the_plaintext_has_readable_names() {
    let message = PushMessage {
        body: PushBody::Transaction {
            transaction_id: Bytes([5; 16]),
        },
        sent_at_ms: 9,
    };
    let json = cbor::value_to_json(
        &cbor::decode_value(&cbor::to_canonical_vec(&message).unwrap()).unwrap(),
    );
    assert_eq!(
        json["body"]["transaction"]["transaction_id"],
        "05".repeat(16)
    );
    assert_eq!(json["sent_at_ms"], 9);
    let deleted = PushMessage {
        body: PushBody::AccountDeleted,
        sent_at_ms: 1,
    };
    let bytes = cbor::to_canonical_vec(&deleted).unwrap();
    assert_eq!(
        cbor::value_to_json(&cbor::decode_value(&bytes).unwrap())["body"],
        "account_deleted"
    );
    // Unknown fields are refused, not ignored.
    let extra = cbor::to_canonical_vec(&serde_json::json!({
        "body": "account_deleted", "sent_at_ms": 1, "urgent": true
    }))
    .unwrap();
    assert!(cbor::from_canonical_slice::<PushMessage>(&extra).is_err());
}

/// The example in `docs/message-center.md`: fixed keys and randomness, so the bytes are
/// fixed; a change to the format changes this test and the doc together.
#[test]
fn the_documented_example_envelope() {
    let f = fixture();
    let bytes = sealed(&f);
    assert_eq!(
        [
            hex::encode(&bytes),
            hex::encode(f.account_secret),
            hex::encode(&f.account_public),
            hex::encode(&f.server_public),
            hex::encode(cbor::to_canonical_vec(&f.message).unwrap()),
        ],
        [
            DOC_EXAMPLE_ENVELOPE,
            DOC_EXAMPLE_ACCOUNT_SECRET,
            DOC_EXAMPLE_ACCOUNT_PUBLIC,
            DOC_EXAMPLE_SERVER_PUBLIC,
            DOC_EXAMPLE_PLAINTEXT,
        ]
    );
}

const DOC_EXAMPLE_ENVELOPE: &str = "a661760162637458592122b33f92fe0e8b409ec9166ecb9e99c628e6c6c2aac8139f7888f25aa5e7449a2bf5727c172c129f815f3c68be4336850d12d9adf3794cf7627e3a80115018d83cfced91dde7de22b5fd40a645fc7ed740d1b8f7d95968a9626964503333333333333333333333333333333363656e63584104fd7742d8282d007cadb315dd6dcb7075b7a67dd187010c09deb891c792ad20506be9c97664e6df4292e8b1305b47b1e30a83c61376af92efac663e59f8e9d83b636578701b0000018bcfe65260636b696448cfb5c2cc2982c940";
const DOC_EXAMPLE_ACCOUNT_SECRET: &str =
    "ee1a058abd2dccd09838121b5cf7b33e015588bd163b70a2754666ab3a11bdee";
const DOC_EXAMPLE_ACCOUNT_PUBLIC: &str = "04464dce5616c4db38f14c28351a74d6a2960d275c91f0dbe9db16a3e60b356ce2849fdb19dbd4b764e38fd325326bba78b44c03340120273bb269a1998cf9be31";
const DOC_EXAMPLE_SERVER_PUBLIC: &str = "04d20ffcc4e928b997212c57f5406cb75f37cc56776a9034e2b60dc6243cf79af7a3be5e6bee37b489c9ab67248624c1533bff050dd014747f0f336325b97b27b4";
const DOC_EXAMPLE_PLAINTEXT: &str = "a264626f6479a1656c6f67696ea16468736964582044444444444444444444444444444444444444444444444444444444444444446a73656e745f61745f6d731b0000018bcfe56800";

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        if let Ok(e) = decode_envelope(&bytes) {
            proptest::prop_assert_eq!(e.encode(), bytes);
        }
    }
}
