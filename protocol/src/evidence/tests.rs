#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::expect_used)]

use proptest::prelude::*;
use serde::Serialize;

use super::*;
use crate::attestation::{AttestationClaims, sign_attestation};
use crate::checkpoint::sign_checkpoint;
use crate::merkle::MemoryTree;

const T: i64 = 1_800_000_000_000;
const SERVER: [u8; 16] = [0xab; 16];
const TX: [u8; 16] = [0x01; 16];
const ACCOUNT: [u8; 16] = [0x02; 16];
const ENROLMENT_POSITION: u64 = 2;
const SIGNED_POSITION: u64 = 4;
const TREE_SIZE: u64 = 6;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).unwrap()
}
fn audit() -> SigningKey {
    key(1)
}
fn sfs() -> SigningKey {
    key(2)
}
fn account_key() -> SigningKey {
    key(3)
}
fn uncompressed(k: &SigningKey) -> [u8; 65] {
    k.verifying_key()
        .as_affine()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

/// `account.registered` v1 as the domain crate writes it (every field, so the verifier is shown
/// to ignore the ones it does not need).
#[derive(Serialize)]
struct Registered {
    account: AccountRef,
    app_instance: Bytes<16>,
    user: Option<Bytes<16>>,
    #[serde(with = "serde_bytes")]
    channel_public_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signing_public_key: Vec<u8>,
    signing_key_thumbprint: Bytes<32>,
    second_factor: Option<&'static str>,
}

#[derive(Serialize)]
struct AccountRef {
    server_id: Bytes<16>,
    account_id: Bytes<16>,
}

/// `account.key_rotated` v1 as the domain crate writes it.
#[derive(Serialize)]
struct KeyRotated {
    role: &'static str,
    #[serde(with = "serde_bytes")]
    public_key: Vec<u8>,
    key_thumbprint: Bytes<32>,
}

/// One `account.key_rotated` the fixture writes into the log (and the bundle carries).
#[derive(Clone)]
struct Rotation {
    position: u64,
    role: &'static str,
    key: SigningKey,
    stream_account: [u8; 16],
    event_type: &'static str,
}

impl Rotation {
    /// A rotation of this account's signing key to `key`, at `position`.
    fn signing(position: u64, key: SigningKey) -> Self {
        Self {
            position,
            role: "signing",
            key,
            stream_account: ACCOUNT,
            event_type: "account.key_rotated",
        }
    }

    fn event(&self) -> Vec<u8> {
        let public_key = uncompressed(&self.key);
        canonical_event(
            self.position,
            &stream_name("account", &SERVER, &self.stream_account),
            self.event_type,
            &cbor::to_canonical_vec(&KeyRotated {
                role: self.role,
                public_key: public_key.to_vec(),
                key_thumbprint: Bytes(sha256(&public_key)),
            })
            .unwrap(),
        )
    }
}

/// `transaction.signed` v1 as the domain crate writes it.
#[derive(Serialize)]
struct Signed {
    account_id: Bytes<16>,
    data_hash: Bytes<32>,
    text_hash: Bytes<32>,
    content_type: &'static str,
    created_at: i64,
    expires_at: i64,
    #[serde(with = "serde_bytes")]
    device_signature: Vec<u8>,
    #[serde(with = "serde_bytes")]
    attestation: Vec<u8>,
    factor: &'static str,
    device_time: i64,
    signed_at: i64,
}

/// `RecordedEvent::canonical_bytes` of the event store, rebuilt from its documented layout.
fn canonical_event(position: u64, stream: &str, event_type: &str, payload: &[u8]) -> Vec<u8> {
    let metadata = cbor::to_canonical_vec(&BTreeMap::from([("actor", "system")])).unwrap();
    let event_id = [position as u8; 16];
    cbor::to_canonical_vec(&(
        position,
        stream,
        0u64,
        serde_bytes::Bytes::new(&event_id),
        event_type,
        1u16,
        serde_bytes::Bytes::new(payload),
        serde_bytes::Bytes::new(&metadata),
        T + position as i64,
    ))
    .unwrap()
}

/// Everything a bundle is built from; each test changes one thing.
struct Fixture {
    data: Vec<u8>,
    text: String,
    signer: SigningKey,
    enrolled: SigningKey,
    signed_tx: SignedTransaction,
    signed_event_tx: [u8; 16],
    challenge_tx: [u8; 16],
    attestation_issued_at: i64,
    attested_app_instance: [u8; 16],
    /// Signing-key rotations in the log (each is carried in the bundle unless `carried` says
    /// otherwise).
    rotations: Vec<Rotation>,
    /// Which of `rotations` the bundle carries (all when `None`).
    carried: Option<Vec<usize>>,
    signed_position: u64,
}

impl Fixture {
    fn new() -> Self {
        Self {
            data: b"{\"amount\":\"100.00\",\"to\":\"CH93 0076 2011 6238 5295 7\"}".to_vec(),
            text: "Pay CHF 100.00 to CH93 0076 2011 6238 5295 7?".to_owned(),
            signer: account_key(),
            enrolled: account_key(),
            signed_tx: SignedTransaction {
                transaction_id: Bytes(TX),
                server_id: Bytes(SERVER),
                data_hash: Bytes([0; 32]),
                text_hash: Bytes([0; 32]),
                attestation_hash: Bytes([0; 32]),
                device_time_ms: T + 1_000,
                device_data: BTreeMap::from([
                    ("model".to_owned(), "Pixel 9".to_owned()),
                    ("os".to_owned(), "Android 16".to_owned()),
                ]),
                client_data: Some(b"client".to_vec()),
            },
            signed_event_tx: TX,
            challenge_tx: TX,
            attestation_issued_at: T,
            attested_app_instance: [7; 16],
            rotations: Vec::new(),
            carried: None,
            signed_position: SIGNED_POSITION,
        }
    }

    /// The fixture with the signing key rotated at `rotations` (position and new key, oldest
    /// first; the signing event moves to position 9 to make room), signed by the last new key.
    fn rotated(rotations: &[(u64, u8)]) -> Self {
        let mut f = Self::new();
        f.signed_position = 9;
        f.rotations = rotations
            .iter()
            .map(|&(position, seed)| Rotation::signing(position, key(seed)))
            .collect();
        if let Some(last) = f.rotations.last() {
            f.signer = last.key.clone();
        }
        f
    }

    /// Builds the bundle; hashes in `signed_tx` left all-zero are filled in correctly.
    fn build(&self) -> Evidence {
        let data_hash = sha256(&self.data);
        let text_hash = sha256(self.text.as_bytes());
        let claims = AttestationClaims {
            app_instance: Bytes(self.attested_app_instance),
            factor: Factor::Pin,
            challenge: Bytes(transaction_challenge(
                &SERVER,
                &self.challenge_tx,
                &data_hash,
                &text_hash,
            )),
            account_key_thumbprint: Bytes(account_key_thumbprint(self.signer.verifying_key())),
            issued_at_ms: self.attestation_issued_at,
            expires_at_ms: self.attestation_issued_at + 60_000,
            attestation_id: Bytes([8; 16]),
        };
        let attestation = sign_attestation(&claims, &sfs()).unwrap();
        let mut tx = self.signed_tx.clone();
        let fill = |b: &mut Bytes<32>, v: [u8; 32]| {
            if b.0 == [0; 32] {
                b.0 = v;
            }
        };
        fill(&mut tx.data_hash, data_hash);
        fill(&mut tx.text_hash, text_hash);
        fill(
            &mut tx.attestation_hash,
            attestation::attestation_hash(&attestation),
        );
        let device_signature = sign_transaction(&tx, &self.signer).unwrap();

        let enrolled = uncompressed(&self.enrolled);
        let registered = Registered {
            account: AccountRef {
                server_id: Bytes(SERVER),
                account_id: Bytes(ACCOUNT),
            },
            app_instance: Bytes([7; 16]),
            user: None,
            channel_public_key: uncompressed(&key(9)).to_vec(),
            signing_public_key: enrolled.to_vec(),
            signing_key_thumbprint: Bytes(sha256(&enrolled)),
            second_factor: Some("pin"),
        };
        let enrolment_event = canonical_event(
            ENROLMENT_POSITION,
            &stream_name("account", &SERVER, &ACCOUNT),
            "account.registered",
            &cbor::to_canonical_vec(&registered).unwrap(),
        );
        let signed = Signed {
            account_id: Bytes(ACCOUNT),
            data_hash: Bytes(sha256(&self.data)),
            text_hash: Bytes(sha256(self.text.as_bytes())),
            content_type: "application/json",
            created_at: T - 10_000,
            expires_at: T + 300_000,
            device_signature: device_signature.clone(),
            attestation: attestation.clone(),
            factor: "pin",
            device_time: T,
            signed_at: T + 2_000,
        };
        let signed_event = canonical_event(
            self.signed_position,
            &stream_name("transaction", &SERVER, &self.signed_event_tx),
            "transaction.signed",
            &cbor::to_canonical_vec(&signed).unwrap(),
        );

        let tree_size = TREE_SIZE.max(self.signed_position + 2);
        let mut tree = MemoryTree::new();
        for i in 0..tree_size {
            if i == ENROLMENT_POSITION {
                tree.push_leaf(&enrolment_event);
            } else if i == self.signed_position {
                tree.push_leaf(&signed_event);
            } else if let Some(r) = self.rotations.iter().find(|r| r.position == i) {
                tree.push_leaf(&r.event());
            } else {
                tree.push_leaf(&canonical_event(i, "server-x", "server.created", &[0xa0]));
            }
        }
        let proof = |i| {
            tree.inclusion_proof(i, tree_size)
                .unwrap()
                .into_iter()
                .map(Bytes)
                .collect()
        };
        let checkpoint = sign_checkpoint(
            &TreeHead {
                origin: "countersign.example".to_owned(),
                tree_size,
                root_hash: tree.root(),
                timestamp_ms: T + 5_000,
            },
            &audit(),
        )
        .unwrap();

        Evidence {
            version: EVIDENCE_VERSION,
            transaction: TransactionRequest {
                transaction_id: Bytes(TX),
                server_id: Bytes(SERVER),
                data: self.data.clone(),
                content_type: "application/json".to_owned(),
                text: self.text.clone(),
                created_at_ms: T - 10_000,
                expires_at_ms: T + 300_000,
            },
            device_signature,
            attestation,
            account: AccountProof {
                account_id: Bytes(ACCOUNT),
                signing_public_key: Bytes(uncompressed(&self.signer)),
                enrolment_event,
                enrolment_position: ENROLMENT_POSITION,
                enrolment_proof: proof(ENROLMENT_POSITION),
                key_rotations: self
                    .rotations
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| self.carried.as_ref().is_none_or(|c| c.contains(i)))
                    .map(|(_, r)| KeyRotationProof {
                        event: r.event(),
                        position: r.position,
                        proof: proof(r.position),
                    })
                    .collect(),
            },
            signed_event,
            signed_position: self.signed_position,
            inclusion_proof: proof(self.signed_position),
            checkpoint,
        }
    }
}

fn verify_bytes(bytes: &[u8]) -> Result<VerifiedEvidence, EvidenceError> {
    verify_evidence(
        bytes,
        audit().verifying_key(),
        &[*key(5).verifying_key(), *sfs().verifying_key()],
        Some(T + 86_400_000 * 365 * 10),
    )
}

fn verify(ev: &Evidence) -> Result<VerifiedEvidence, EvidenceError> {
    verify_bytes(&ev.to_cbor().unwrap())
}

fn valid() -> Evidence {
    Fixture::new().build()
}

/// The valid bundle with one change.
fn with(change: impl FnOnce(&mut Evidence)) -> Result<VerifiedEvidence, EvidenceError> {
    let mut ev = valid();
    change(&mut ev);
    verify(&ev)
}

fn flip_last(bytes: &mut [u8]) {
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
}

#[test]
fn a_complete_bundle_verifies_ten_years_later() {
    let ev = valid();
    let bytes = ev.to_cbor().unwrap();
    let verified = verify_bytes(&bytes).unwrap();
    assert_eq!(verified.transaction_id, TX);
    assert_eq!(verified.server_id, SERVER);
    assert_eq!(verified.account_id, ACCOUNT);
    assert_eq!(verified.factor, Factor::Pin);
    assert_eq!(verified.app_instance, [7; 16]);
    assert_eq!(verified.device_time_ms, T + 1_000);
    assert_eq!(verified.signed_position, SIGNED_POSITION);
    assert_eq!(verified.checkpoint.tree_size, TREE_SIZE);
    assert_eq!(verified.checkpoint.timestamp_ms, T + 5_000);
    assert_eq!(verified.checkpoint.origin, "countersign.example");
    // Without a clock too, and deterministically encoded.
    assert!(
        verify_evidence(
            &bytes,
            audit().verifying_key(),
            &[*sfs().verifying_key()],
            None
        )
        .is_ok()
    );
    assert_eq!(Evidence::from_cbor(&bytes).unwrap(), ev);
    assert_eq!(valid().to_cbor().unwrap(), bytes);
}

#[test]
fn the_json_rendering_shows_bytes_as_hex() {
    let json = valid().to_json();
    assert_eq!(json["version"], 1);
    assert_eq!(json["transaction"]["transaction_id"], hex::encode(TX));
    assert_eq!(json["transaction"]["text"], Fixture::new().text);
    assert_eq!(
        json["account"]["signing_public_key"],
        hex::encode(uncompressed(&account_key()))
    );
    assert_eq!(json["signed_position"], SIGNED_POSITION);
    assert_eq!(
        json["signed_transaction"]["device_data"]["model"],
        "Pixel 9"
    );
    assert_eq!(
        json["signed_transaction"]["client_data"],
        hex::encode(b"client")
    );
}

fn keys(value: &Value) -> Vec<String> {
    match value {
        Value::Map(entries) => entries
            .iter()
            .map(|(k, _)| match k {
                Value::Text(t) => t.clone(),
                _ => "?".to_owned(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    match value {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == name))
            .map(|(_, v)| v)
            .unwrap(),
        _ => panic!("not a map"),
    }
}

#[test]
fn the_bundle_is_the_documented_map_in_the_documented_order() {
    let bundle = cbor::decode_value(&valid().to_cbor().unwrap()).unwrap();
    assert_eq!(
        keys(&bundle),
        [
            "account",
            "version",
            "checkpoint",
            "attestation",
            "transaction",
            "signed_event",
            "inclusion_proof",
            "signed_position",
            "device_signature",
        ]
    );
    assert_eq!(
        keys(field(&bundle, "transaction")),
        [
            "data",
            "text",
            "server_id",
            "content_type",
            "created_at_ms",
            "expires_at_ms",
            "transaction_id",
        ]
    );
    assert_eq!(
        keys(field(&bundle, "account")),
        [
            "account_id",
            "enrolment_event",
            "enrolment_proof",
            "enrolment_position",
            "signing_public_key",
        ]
    );
    assert!(matches!(field(&bundle, "version"), Value::Integer(1)));
}

#[test]
fn the_signed_transaction_is_the_documented_map() {
    let mut tx = Fixture::new().signed_tx;
    tx.client_data = None;
    let bytes = cbor::to_canonical_vec(&tx).unwrap();
    let Value::Map(entries) = cbor::decode_value(&bytes).unwrap() else {
        panic!("not a map");
    };
    let keys: Vec<_> = entries
        .iter()
        .map(|(k, _)| match k {
            Value::Text(t) => t.as_str(),
            _ => "?",
        })
        .collect();
    // Deterministic order: shorter keys first, then bytewise (as docs/evidence.md lists them).
    assert_eq!(
        keys,
        [
            "data_hash",
            "server_id",
            "text_hash",
            "client_data",
            "device_data",
            "device_time_ms",
            "transaction_id",
            "attestation_hash",
        ]
    );
    assert!(matches!(entries[3].1, Value::Null));
    let signed = sign_transaction(&tx, &account_key()).unwrap();
    assert_eq!(
        verify_signed_transaction(&signed, account_key().verifying_key()).unwrap(),
        tx
    );
    assert_eq!(
        verify_signed_transaction(&signed, key(4).verifying_key()),
        Err(EvidenceError::BadDeviceSignature)
    );
    // A signature by the right key over a payload of another kind.
    let other = cose::sign1_es256(
        &account_key(),
        &ProtectedFields {
            content_type: Some(ContentType::MediaType(
                attestation::ATTESTATION_CONTENT_TYPE.to_owned(),
            )),
            key_id: Some(account_key_thumbprint(account_key().verifying_key()).to_vec()),
        },
        &bytes,
        b"",
    )
    .unwrap();
    assert_eq!(
        verify_signed_transaction(&other, account_key().verifying_key()),
        Err(EvidenceError::NotASignedTransaction("content type"))
    );
    // Over the limits: refused when signing.
    let mut big = tx.clone();
    big.client_data = Some(vec![0; MAX_CLIENT_DATA_BYTES + 1]);
    assert_eq!(
        sign_transaction(&big, &account_key()),
        Err(EvidenceError::Limit("client_data"))
    );
    let mut many = tx;
    many.device_data = (0..=MAX_DEVICE_DATA_ENTRIES)
        .map(|i| (format!("k{i}"), String::new()))
        .collect();
    assert_eq!(
        sign_transaction(&many, &account_key()),
        Err(EvidenceError::Limit("device_data entries"))
    );
}

#[test]
fn the_transaction_challenge_is_the_documented_hash() {
    let mut input = b"countersign/transaction-challenge/v1\x00".to_vec();
    input.extend_from_slice(&SERVER);
    input.extend_from_slice(&TX);
    input.extend_from_slice(&[3; 32]);
    input.extend_from_slice(&[4; 32]);
    assert_eq!(
        transaction_challenge(&SERVER, &TX, &[3; 32], &[4; 32]),
        sha256(&input)
    );
    assert_ne!(
        transaction_challenge(&SERVER, &[9; 16], &[3; 32], &[4; 32]),
        sha256(&input)
    );
}

#[test]
fn each_tampered_part_is_refused_with_its_reason() {
    use EvidenceError as E;
    // 1. Checkpoint.
    assert!(matches!(
        with(|e| flip_last(&mut e.checkpoint)),
        Err(E::Checkpoint(CheckpointError::Cose(
            CoseError::BadSignature
        )))
    ));
    let other_audit = verify_evidence(
        &valid().to_cbor().unwrap(),
        key(6).verifying_key(),
        &[*sfs().verifying_key()],
        None,
    );
    assert!(matches!(other_audit, Err(E::Checkpoint(_))));
    let early = verify_evidence(
        &valid().to_cbor().unwrap(),
        audit().verifying_key(),
        &[*sfs().verifying_key()],
        Some(T - 1),
    );
    assert_eq!(early, Err(E::CheckpointInFuture));
    // 2. The signing event's inclusion.
    assert_eq!(
        with(|e| e.inclusion_proof[0].0[0] ^= 1),
        Err(E::SignedEventNotIncluded(ProofError::RootMismatch))
    );
    assert_eq!(
        with(|e| flip_last(&mut e.signed_event)),
        Err(E::SignedEventNotIncluded(ProofError::RootMismatch))
    );
    assert!(matches!(
        with(|e| e.signed_position = 3),
        Err(E::SignedEventNotIncluded(_))
    ));
    // 3. The enrolment event's inclusion.
    assert_eq!(
        with(|e| e.account.enrolment_proof[1].0[31] ^= 1),
        Err(E::EnrolmentNotIncluded(ProofError::RootMismatch))
    );
    assert_eq!(
        with(|e| flip_last(&mut e.account.enrolment_event)),
        Err(E::EnrolmentNotIncluded(ProofError::RootMismatch))
    );
    // 4. Enrolment of another account (the bundle names another account id).
    assert_eq!(
        with(|e| e.account.account_id = Bytes([9; 16])),
        Err(E::EnrolmentEvent("not this account's stream"))
    );
    // 5. Device signature.
    assert_eq!(
        with(|e| flip_last(&mut e.device_signature)),
        Err(E::BadDeviceSignature)
    );
    assert!(matches!(
        with(|e| e.device_signature.truncate(10)),
        Err(E::DeviceSignature(_))
    ));
    // 6. Data and text.
    assert_eq!(with(|e| e.transaction.data[0] ^= 1), Err(E::DataMismatch));
    assert_eq!(with(|e| e.transaction.text.push('!')), Err(E::TextMismatch));
    // 8. Attestation.
    assert_eq!(
        with(|e| flip_last(&mut e.attestation)),
        Err(E::Attestation(AttestationError::BadSignature))
    );
    let no_sfs = verify_evidence(
        &valid().to_cbor().unwrap(),
        audit().verifying_key(),
        &[*key(5).verifying_key()],
        None,
    );
    assert_eq!(no_sfs, Err(E::Attestation(AttestationError::UntrustedKey)));
}

/// Issue 19 item 10: a bundle whose checkpoint, device signature or attestation is another
/// encoding of the signed object (untagged, `d812`, indefinite or long heads, an unprotected
/// header carrying a blob, another kid or a content type) verified before; each is refused now
/// with the reason, and the valid bundle is unique.
#[test]
fn every_cose_sign1_in_the_bundle_has_its_one_encoding() {
    use EvidenceError as E;
    let ev = valid();
    for v in cose::noncanonical::variants(&ev.checkpoint).unwrap() {
        assert_eq!(
            with(|e| e.checkpoint = v.bytes.clone()),
            Err(E::Checkpoint(CheckpointError::Cose(v.refused_with))),
            "checkpoint: {}",
            v.name
        );
    }
    for v in cose::noncanonical::variants(&ev.device_signature).unwrap() {
        assert_eq!(
            with(|e| e.device_signature = v.bytes.clone()),
            Err(E::DeviceSignature(v.refused_with)),
            "device signature: {}",
            v.name
        );
    }
    for v in cose::noncanonical::variants(&ev.attestation).unwrap() {
        assert_eq!(
            with(|e| e.attestation = v.bytes.clone()),
            Err(E::Attestation(AttestationError::Cose(v.refused_with))),
            "attestation: {}",
            v.name
        );
    }
    let loose = cose::noncanonical::loose_protected_header(&ev.checkpoint, &audit(), b"").unwrap();
    assert_eq!(
        with(|e| e.checkpoint = loose),
        Err(E::Checkpoint(CheckpointError::Cose(
            CoseError::NotDeterministic("protected header")
        )))
    );
}

#[test]
fn a_device_signature_over_a_non_deterministic_payload_is_refused() {
    let tx = Fixture::new().signed_tx;
    let canonical = cbor::to_canonical_vec(&tx).unwrap();
    let reordered = cose::noncanonical::reordered_map(&canonical).unwrap();
    assert_eq!(
        cbor::from_slice::<SignedTransaction>(&reordered).unwrap(),
        tx
    );
    let fields = ProtectedFields {
        content_type: Some(ContentType::MediaType(
            SIGNED_TRANSACTION_CONTENT_TYPE.to_owned(),
        )),
        key_id: Some(account_key_thumbprint(account_key().verifying_key()).to_vec()),
    };
    let signed = cose::sign1_es256(&account_key(), &fields, &reordered, b"").unwrap();
    assert_eq!(
        verify_signed_transaction(&signed, account_key().verifying_key()),
        Err(EvidenceError::NotDeterministic("signed transaction"))
    );
}

#[test]
fn a_signature_replayed_onto_another_transaction_is_refused() {
    // The bundle claims another transaction id for the same signature.
    assert_eq!(
        with(|e| e.transaction.transaction_id = Bytes([0x0f; 16])),
        Err(EvidenceError::TransactionMismatch)
    );
    // The device signed the right transaction, but the attestation was for another one.
    let mut f = Fixture::new();
    f.challenge_tx = [0x0f; 16];
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::Attestation(
            AttestationError::ChallengeMismatch
        ))
    );
    // Everything proper, but the logged signing event belongs to another transaction.
    let mut f = Fixture::new();
    f.signed_event_tx = [0x0f; 16];
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::SignedEvent("names another transaction"))
    );
    // The device signed another attestation than the bundle's.
    let mut f = Fixture::new();
    f.signed_tx.attestation_hash = Bytes([5; 32]);
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::AttestationHashMismatch)
    );
    // A signing event that records other bytes than the bundle's (a re-signed, equivalent
    // device signature is still another signature).
    let mut f = Fixture::new();
    f.signed_tx
        .device_data
        .insert("x".to_owned(), "y".to_owned());
    let other = f.build();
    assert_eq!(
        with(|e| e.device_signature = other.device_signature),
        Err(EvidenceError::SignedEvent(
            "records another signature or attestation"
        ))
    );
}

#[test]
fn a_key_other_than_the_enrolled_one_is_refused() {
    let mut f = Fixture::new();
    f.signer = key(4);
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::AccountKeyNotEnrolled)
    );
    // Swapping only the key in a valid bundle is refused the same way.
    assert_eq!(
        with(|e| e.account.signing_public_key = Bytes(uncompressed(&key(4)))),
        Err(EvidenceError::AccountKeyNotEnrolled)
    );
}

/// Issue 19 item 12: an account whose signing key was rotated before it signed produces a
/// bundle that verifies, through the chain of `account.key_rotated` events from the enrolled
/// key; a never-rotated account's bundle has no `key_rotations` key and is unchanged.
#[test]
fn a_key_rotated_before_signing_verifies_through_its_chain() {
    let ev = Fixture::rotated(&[(3, 10), (6, 11)]).build();
    assert_eq!(ev.account.signing_public_key.0, uncompressed(&key(11)));
    assert_eq!(ev.account.key_rotations.len(), 2);
    let bytes = ev.to_cbor().unwrap();
    let verified = verify_bytes(&bytes).unwrap();
    assert_eq!(verified.account_id, ACCOUNT);
    assert_eq!(verified.signed_position, 9);
    assert_eq!(Evidence::from_cbor(&bytes).unwrap(), ev);
    // One link is enough when the key was rotated once.
    verify(&Fixture::rotated(&[(5, 10)]).build()).unwrap();
    // The field sits in deterministic order (13 bytes: after `account_id`), and its links are
    // the documented map.
    let bundle = cbor::decode_value(&bytes).unwrap();
    let account = field(&bundle, "account");
    assert_eq!(
        keys(account),
        [
            "account_id",
            "key_rotations",
            "enrolment_event",
            "enrolment_proof",
            "enrolment_position",
            "signing_public_key",
        ]
    );
    let Value::Array(links) = field(account, "key_rotations") else {
        panic!("not an array");
    };
    assert_eq!(keys(&links[0]), ["event", "proof", "position"]);
    // Without rotations the key is absent, not an empty list.
    let plain = cbor::decode_value(&valid().to_cbor().unwrap()).unwrap();
    assert!(!keys(field(&plain, "account")).contains(&"key_rotations".to_owned()));
}

#[test]
fn a_missing_rotation_link_is_refused() {
    let mut f = Fixture::rotated(&[(3, 10), (6, 11)]);
    // Without any link the rotated key is not the enrolled one (the version 1 answer).
    f.carried = Some(Vec::new());
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::AccountKeyNotEnrolled)
    );
    // Without the last link the chain ends at the intermediate key.
    f.carried = Some(vec![0]);
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::AccountKeyNotEnrolled)
    );
    // What the chain cannot show: that no earlier link is missing. Without the first link the
    // chain still proves the signing key was enrolled for this account before signing.
    f.carried = Some(vec![1]);
    assert!(verify(&f.build()).is_ok());
}

#[test]
fn rotation_links_out_of_order_are_refused() {
    let ev = Fixture::rotated(&[(3, 10), (6, 11)]).build();
    let mut swapped = ev.clone();
    swapped.account.key_rotations.swap(0, 1);
    assert_eq!(
        verify(&swapped),
        Err(EvidenceError::KeyRotation {
            link: 1,
            reason: "not after the previous link or the enrolment"
        })
    );
    let mut repeated = ev;
    let last = repeated.account.key_rotations[1].clone();
    repeated.account.key_rotations.push(last);
    assert_eq!(
        verify(&repeated),
        Err(EvidenceError::KeyRotation {
            link: 2,
            reason: "not after the previous link or the enrolment"
        })
    );
    // A rotation logged before the enrolment is not a link of this enrolment's chain.
    assert_eq!(
        verify(&Fixture::rotated(&[(1, 10)]).build()),
        Err(EvidenceError::KeyRotation {
            link: 0,
            reason: "not after the previous link or the enrolment"
        })
    );
}

#[test]
fn a_rotation_after_the_signing_event_is_refused() {
    // The signing event is at 9; the second rotation at 10, after it.
    assert_eq!(
        verify(&Fixture::rotated(&[(3, 10), (10, 11)]).build()),
        Err(EvidenceError::KeyRotation {
            link: 1,
            reason: "not before the signing event"
        })
    );
}

#[test]
fn only_signing_key_rotations_of_this_account_are_links() {
    let link = |change: fn(&mut Rotation)| {
        let mut f = Fixture::rotated(&[(3, 10)]);
        change(&mut f.rotations[0]);
        verify(&f.build())
    };
    let refused = |reason| Err(EvidenceError::KeyRotation { link: 0, reason });
    assert_eq!(
        link(|r| r.role = "channel"),
        refused("rotates another key than the signing key")
    );
    assert_eq!(
        link(|r| r.stream_account = [9; 16]),
        refused("not this account's stream")
    );
    assert_eq!(
        link(|r| r.event_type = "account.upgraded"),
        refused("not account.key_rotated v1")
    );
    // A link carried at another position than its leaf's.
    let mut f = Fixture::rotated(&[(3, 10)]);
    f.rotations.push(Rotation::signing(5, key(12)));
    let mut ev = f.build();
    ev.account.key_rotations.truncate(1);
    let mut moved = ev.account.key_rotations[0].clone();
    moved.position = 5;
    moved.proof = ev.account.key_rotations[0].proof.clone();
    ev.account.key_rotations[0] = moved;
    assert!(matches!(
        verify(&ev),
        Err(EvidenceError::KeyRotationNotIncluded { link: 0, .. })
    ));
}

#[test]
fn a_rotation_link_must_be_included_under_the_checkpoint() {
    let ev = Fixture::rotated(&[(3, 10), (6, 11)]).build();
    let mut proof = ev.clone();
    proof.account.key_rotations[1].proof[0].0[0] ^= 1;
    assert_eq!(
        verify(&proof),
        Err(EvidenceError::KeyRotationNotIncluded {
            link: 1,
            error: ProofError::RootMismatch
        })
    );
    let mut event = ev;
    flip_last(&mut event.account.key_rotations[0].event);
    assert_eq!(
        verify(&event),
        Err(EvidenceError::KeyRotationNotIncluded {
            link: 0,
            error: ProofError::RootMismatch
        })
    );
}

#[test]
fn an_empty_or_overlong_rotation_list_is_refused() {
    let bytes = valid().to_cbor().unwrap();
    let with_rotations = |v: Value| {
        let mut bundle = cbor::decode_value(&bytes).unwrap();
        if let Value::Map(entries) = &mut bundle {
            for (k, account) in entries.iter_mut() {
                if let (Value::Text(t), Value::Map(fields)) = (k, account)
                    && t == "account"
                {
                    fields.push((Value::Text("key_rotations".to_owned()), v.clone()));
                }
            }
        }
        Evidence::from_cbor(&cbor::encode_canonical(&bundle))
    };
    assert_eq!(
        with_rotations(Value::Array(Vec::new())),
        Err(EvidenceError::Malformed {
            what: "evidence bundle",
            reason: "account.key_rotations is empty (omit it instead)".to_owned(),
        })
    );
    assert!(matches!(
        with_rotations(Value::Null),
        Err(EvidenceError::Malformed { .. })
    ));
    let mut long = Fixture::rotated(&[(3, 10)]).build();
    let link = long.account.key_rotations[0].clone();
    long.account.key_rotations = vec![link; MAX_KEY_ROTATIONS + 1];
    assert_eq!(
        long.to_cbor(),
        Err(EvidenceError::Limit("account.key_rotations"))
    );
}

/// Issue 19 item 11: the factor must have been proven on the app instance the account was
/// enrolled from; an attestation of another installation (holding a copy of the key, or
/// another app of the same user) no longer verifies.
#[test]
fn the_attestation_must_come_from_the_enrolled_app_instance() {
    let mut f = Fixture::new();
    f.attested_app_instance = [0x0e; 16];
    assert_eq!(verify(&f.build()), Err(EvidenceError::AppInstanceMismatch));
}

#[test]
fn the_attestation_is_judged_at_the_device_time() {
    let mut f = Fixture::new();
    f.signed_tx.device_time_ms = T + 60_001;
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::Attestation(AttestationError::Expired))
    );
    let mut f = Fixture::new();
    f.attestation_issued_at = T + 1_000 + 5_001;
    assert_eq!(
        verify(&f.build()),
        Err(EvidenceError::Attestation(AttestationError::NotYetValid))
    );
}

#[test]
fn decoding_is_strict() {
    let ev = valid();
    let bytes = ev.to_cbor().unwrap();
    // Another version.
    let mut v2 = cbor::decode_value(&bytes).unwrap();
    if let Value::Map(entries) = &mut v2 {
        for (k, v) in entries.iter_mut() {
            if matches!(k, Value::Text(t) if t == "version") {
                *v = Value::Integer(2);
            }
        }
    }
    assert_eq!(
        Evidence::from_cbor(&cbor::encode_canonical(&v2)),
        Err(EvidenceError::UnsupportedVersion("2".to_owned()))
    );
    let mut bad = ev.clone();
    bad.version = 2;
    assert!(matches!(
        bad.to_cbor(),
        Err(EvidenceError::UnsupportedVersion(_))
    ));
    // An unknown key.
    let mut extra = cbor::decode_value(&bytes).unwrap();
    if let Value::Map(entries) = &mut extra {
        entries.push((Value::Text("note".to_owned()), Value::Null));
    }
    assert!(matches!(
        Evidence::from_cbor(&cbor::encode_canonical(&extra)),
        Err(EvidenceError::Malformed { .. })
    ));
    // A non-deterministic encoding of the same bundle (map length in a longer head).
    let mut long_head = vec![0xb8, bytes[0] & 0x1f];
    long_head.extend_from_slice(&bytes[1..]);
    assert_eq!(
        Evidence::from_cbor(&long_head),
        Err(EvidenceError::NotDeterministic("evidence bundle"))
    );
    // Trailing bytes, truncation, size.
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(Evidence::from_cbor(&trailing).is_err());
    assert!(Evidence::from_cbor(&bytes[..bytes.len() - 1]).is_err());
    assert_eq!(
        Evidence::from_cbor(&vec![0; MAX_EVIDENCE_BYTES + 1]),
        Err(EvidenceError::TooLarge)
    );
    // Limits.
    let mut big = ev;
    big.transaction.data = vec![0; MAX_DATA_BYTES + 1];
    assert_eq!(big.to_cbor(), Err(EvidenceError::Limit("transaction.data")));
}

#[test]
fn flipping_any_bit_of_any_byte_never_verifies() {
    let bytes = valid().to_cbor().unwrap();
    verify_bytes(&bytes).unwrap();
    for i in 0..bytes.len() {
        for bit in [0x01, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            assert!(
                verify_bytes(&b).is_err(),
                "byte {i} flipped ({bit:#x}) and verified"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_corruption_never_verifies_and_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let bytes = valid().to_cbor().unwrap();
        let mut b = bytes.clone();
        for (at, x) in &edits {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        if let Ok(v) = verify_bytes(&b) {
            prop_assert!(b == bytes, "corrupted bytes verified");
            prop_assert_eq!(v, verify_bytes(&bytes).unwrap());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(verify_bytes(&b).is_err());
        let _ = Evidence::from_cbor(&b);
    }
}
