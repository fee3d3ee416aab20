//! Assembling a signed transaction's evidence bundle (`docs/evidence.md`) from the log and the
//! audit tree.
//!
//! Rules:
//! - Everything in the bundle comes from stored facts: the transaction's own stream (the data,
//!   text and `transaction.signed`), the signing account's `account.registered` and the
//!   `account.key_rotated` events of its signing key logged before the signature, and the audit
//!   tree's proofs against its newest signed checkpoint. Nothing is recomputed from a read model.
//! - A bundle is only assembled once a checkpoint covers the signing event; before that the
//!   answer is [`EvidenceAssemblyError::NotYetCheckpointed`] (retry after the checkpoint
//!   interval), never a bundle that would not verify.
//! - The events are carried as the audit tree hashed them (`RecordedEvent::canonical_bytes`).

use countersign_domain::account::{AccountEvent, KeyRole};
use countersign_domain::transaction::{
    Transaction, TransactionCreated, TransactionEvent, TransactionStatus,
};
use countersign_domain::{AccountRef, Aggregate as _, TransactionRef};
use countersign_eventstore::{Direction, RecordedEvent, SharedStore, StoreError};
use countersign_protocol::device::Bytes;
use countersign_protocol::evidence::{
    AccountProof, EVIDENCE_VERSION, Evidence, KeyRotationProof, TransactionRequest,
};

use crate::audit::{AuditError, AuditTree};

/// Why no bundle could be assembled.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceAssemblyError {
    /// No such transaction (HTTP 404).
    #[error("transaction not found")]
    NotFound,
    /// The transaction is not signed, so there is nothing to prove (HTTP 409).
    #[error("the transaction is {0}, not signed: there is no evidence")]
    NotSigned(TransactionStatus),
    /// No signed checkpoint covers the signing event yet (HTTP 503, retry shortly).
    #[error("the signature is not yet in a signed checkpoint; retry in a second")]
    NotYetCheckpointed,
    /// The signing account has no `account.registered` (HTTP 500: the log is inconsistent).
    #[error("the signing account's enrolment is missing from the log")]
    EnrolmentMissing,
    /// Reading the log failed (HTTP 500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit tree failed (HTTP 500).
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Reads a whole stream, oldest first.
async fn read_all(store: &SharedStore, stream: &str) -> Result<Vec<RecordedEvent>, StoreError> {
    read_before(store, stream, u64::MAX).await
}

/// Reads a stream, oldest first, up to (excluding) the first event at log position `end` or
/// later.
async fn read_before(
    store: &SharedStore,
    stream: &str,
    end: u64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::new();
    loop {
        let from = events.last().map_or(0, |e: &RecordedEvent| e.version + 1);
        let page = store
            .read_stream(stream, Some(from), Direction::Forwards, 1_000)
            .await?;
        if page.is_empty() {
            return Ok(events);
        }
        let (read, before) = (page.len(), events.len());
        events.extend(page.into_iter().take_while(|e| e.position < end));
        if events.len() - before < read {
            return Ok(events);
        }
    }
}

/// The evidence bundle of a signed transaction, proven against the newest checkpoint.
///
/// # Errors
/// See [`EvidenceAssemblyError`].
pub async fn assemble(
    store: &SharedStore,
    audit: &AuditTree,
    transaction: TransactionRef,
) -> Result<Evidence, EvidenceAssemblyError> {
    let recorded = read_all(store, &transaction.stream()).await?;
    let mut state = Transaction::default();
    let mut signed_recorded = None;
    for event in &recorded {
        let decoded = event.decode::<TransactionEvent>()?;
        if matches!(decoded, TransactionEvent::Signed(_)) {
            signed_recorded = Some(event);
        }
        state.apply(&decoded);
    }
    let (created, signed) = match &state {
        Transaction::NotCreated => return Err(EvidenceAssemblyError::NotFound),
        Transaction::Signed { created, signed } => (created, signed),
        other => return Err(EvidenceAssemblyError::NotSigned(other.status())),
    };
    let signed_recorded = signed_recorded.ok_or(EvidenceAssemblyError::NotFound)?;

    let account = AccountRef::new(transaction.server_id, signed.account_id);
    let keys = signing_keys(store, account, signed_recorded.position).await?;

    let checkpoint = audit
        .find_checkpoint(None)
        .await?
        .filter(|c| c.tree_size > signed_recorded.position)
        .ok_or(EvidenceAssemblyError::NotYetCheckpointed)?;
    let size = checkpoint.tree_size;
    let proof = |hashes: Vec<[u8; 32]>| hashes.into_iter().map(Bytes).collect::<Vec<_>>();
    let inclusion_proof = proof(
        audit
            .inclusion_proof(signed_recorded.position, size)
            .await?,
    );
    let enrolment_proof = proof(audit.inclusion_proof(keys.enrolment.position, size).await?);
    let mut key_rotations = Vec::with_capacity(keys.rotations.len());
    for rotation in &keys.rotations {
        key_rotations.push(KeyRotationProof {
            event: rotation.canonical_bytes()?,
            position: rotation.position,
            proof: proof(audit.inclusion_proof(rotation.position, size).await?),
        });
    }

    Ok(Evidence {
        version: EVIDENCE_VERSION,
        transaction: request(transaction, created),
        device_signature: signed.device_signature.clone(),
        attestation: signed.attestation.clone(),
        account: AccountProof {
            account_id: Bytes(*signed.account_id.as_bytes()),
            signing_public_key: Bytes(keys.signing_key),
            enrolment_event: keys.enrolment.canonical_bytes()?,
            enrolment_position: keys.enrolment.position,
            enrolment_proof,
            key_rotations,
        },
        signed_event: signed_recorded.canonical_bytes()?,
        signed_position: signed_recorded.position,
        inclusion_proof,
        checkpoint: checkpoint.signed,
    })
}

fn request(transaction: TransactionRef, created: &TransactionCreated) -> TransactionRequest {
    TransactionRequest {
        transaction_id: Bytes(*transaction.transaction_id.as_bytes()),
        server_id: Bytes(*transaction.server_id.as_bytes()),
        data: created.data.clone(),
        content_type: created.content_type.clone(),
        text: created.text.clone(),
        created_at_ms: created.created_at.as_millis(),
        expires_at_ms: created.expires_at.as_millis(),
    }
}

/// How the signing account came to hold the key it signed with.
struct SigningKeys {
    /// Its `account.registered`.
    enrolment: RecordedEvent,
    /// Its signing-key `account.key_rotated` events before the signature, oldest first.
    rotations: Vec<RecordedEvent>,
    /// The 65-byte key the last of them (or the enrolment) set: the key that signed.
    signing_key: [u8; 65],
}

/// Reads the account's stream up to the signing event (at log position `signed_position`):
/// its `account.registered` and the rotations of its signing key logged before the signature.
async fn signing_keys(
    store: &SharedStore,
    account: AccountRef,
    signed_position: u64,
) -> Result<SigningKeys, EvidenceAssemblyError> {
    let mut events = read_before(store, &account.stream(), signed_position)
        .await?
        .into_iter();
    let enrolment = events
        .next()
        .ok_or(EvidenceAssemblyError::EnrolmentMissing)?;
    let AccountEvent::Registered(registered) = enrolment.decode::<AccountEvent>()? else {
        return Err(EvidenceAssemblyError::EnrolmentMissing);
    };
    let mut key = registered.signing_public_key;
    let mut rotations = Vec::new();
    for event in events {
        if let AccountEvent::KeyRotated(rotated) = event.decode::<AccountEvent>()?
            && rotated.role == KeyRole::Signing
        {
            key = rotated.public_key;
            rotations.push(event);
        }
    }
    let signing_key: [u8; 65] = key
        .as_slice()
        .try_into()
        .map_err(|_| EvidenceAssemblyError::EnrolmentMissing)?;
    Ok(SigningKeys {
        enrolment,
        rotations,
        signing_key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use countersign_domain::account::{AccountKeyRotated, AccountRegistered};
    use countersign_domain::second_factor::SecondFactorKind;
    use countersign_domain::transaction::{TransactionOrigin, TransactionSigned};
    use countersign_domain::{
        AccountId, AnyEvent, AppInstanceId, ServerId, Timestamp, TransactionId, UserDigest,
    };
    use countersign_eventstore::testing::TestDb;
    use countersign_eventstore::{ExpectedVersion, Metadata, NewEvent, StoreOptions, open};
    use countersign_protocol::attestation::{
        AttestationClaims, Factor, attestation_hash, sign_attestation,
    };
    use countersign_protocol::evidence::{
        SignedTransaction, account_key_thumbprint, sign_transaction, transaction_challenge,
        verify_evidence,
    };
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::sec1::ToSec1Point as _;

    use super::*;

    const T: i64 = 1_800_000_000_000;

    /// SHA-256 (the protocol's attestation hash is exactly that, of any bytes).
    fn sha256(bytes: &[u8]) -> [u8; 32] {
        attestation_hash(bytes)
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn public(key: &SigningKey) -> Vec<u8> {
        key.verifying_key()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    }

    fn rotated(role: KeyRole, key: &SigningKey) -> AccountEvent {
        AccountEvent::KeyRotated(AccountKeyRotated {
            role,
            public_key: public(key),
            key_thumbprint: sha256(&public(key)),
        })
    }

    async fn append(db: &TestDb, stream: &str, event: impl Into<AnyEvent>) {
        let position = db.store.read_all(0, 1_000).await.unwrap().len();
        let id = uuid::Uuid::from_u128(u128::try_from(position).unwrap() + 1);
        let event = NewEvent::from_domain(id, &event.into(), Metadata::default()).unwrap();
        db.store
            .append(stream, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }

    /// Issue 19 item 12: an account whose signing key was rotated twice (with a channel-key
    /// rotation between) signs with its current key; the bundle carries exactly the two
    /// signing-key rotations before the signature (not the channel one, not a later one) and
    /// verifies offline.
    async fn a_bundle_after_key_rotations_verifies(db: &TestDb) {
        let (sfs, audit_key) = (key(2), key(1));
        let server = ServerId::from_bytes([0xab; 16]);
        let account = AccountRef::new(server, AccountId::from_bytes([2; 16]));
        let transaction = TransactionRef::new(server, TransactionId::from_bytes([1; 16]));
        let app_instance = [7; 16];
        let (enrolled, second, current, later) = (key(3), key(4), key(5), key(6));

        append(
            db,
            &account.stream(),
            AccountEvent::Registered(AccountRegistered {
                account,
                app_instance: AppInstanceId::from_bytes(app_instance),
                user: Some(UserDigest::from_bytes([9; 16])),
                channel_public_key: public(&key(8)),
                signing_public_key: public(&enrolled),
                signing_key_thumbprint: sha256(&public(&enrolled)),
                second_factor: Some(SecondFactorKind::Pin),
            }),
        )
        .await;
        append(db, &account.stream(), rotated(KeyRole::Signing, &second)).await;
        append(db, &account.stream(), rotated(KeyRole::Channel, &key(10))).await;
        append(db, &account.stream(), rotated(KeyRole::Signing, &current)).await;

        let (data, text) = (b"{\"amount\":\"1.00\"}".to_vec(), "Pay 1.00?".to_owned());
        let data_hash = sha256(&data);
        let text_hash = sha256(text.as_bytes());
        let created = TransactionCreated {
            transaction,
            user: UserDigest::from_bytes([9; 16]),
            account_id: None,
            data: data.clone(),
            data_hash,
            content_type: "application/json".to_owned(),
            text: text.clone(),
            text_hash,
            announce_info: None,
            created_at: Timestamp::from_millis(T),
            expires_at: Timestamp::from_millis(T + 300_000),
            origin: TransactionOrigin::Api,
        };
        append(
            db,
            &transaction.stream(),
            TransactionEvent::Created(created),
        )
        .await;

        let ids = (
            *transaction.server_id.as_bytes(),
            *transaction.transaction_id.as_bytes(),
        );
        let attestation = sign_attestation(
            &AttestationClaims {
                app_instance: Bytes(app_instance),
                factor: Factor::Pin,
                challenge: Bytes(transaction_challenge(
                    &ids.0, &ids.1, &data_hash, &text_hash,
                )),
                account_key_thumbprint: Bytes(account_key_thumbprint(current.verifying_key())),
                issued_at_ms: T + 1_000,
                expires_at_ms: T + 61_000,
                attestation_id: Bytes([8; 16]),
            },
            &sfs,
        )
        .unwrap();
        let device_signature = sign_transaction(
            &SignedTransaction {
                transaction_id: Bytes(ids.1),
                server_id: Bytes(ids.0),
                data_hash: Bytes(data_hash),
                text_hash: Bytes(text_hash),
                attestation_hash: Bytes(sha256(&attestation)),
                device_time_ms: T + 2_000,
                device_data: BTreeMap::new(),
                client_data: None,
            },
            &current,
        )
        .unwrap();
        append(
            db,
            &transaction.stream(),
            TransactionEvent::Signed(TransactionSigned {
                account_id: account.account_id,
                data_hash,
                text_hash,
                content_type: "application/json".to_owned(),
                created_at: Timestamp::from_millis(T),
                expires_at: Timestamp::from_millis(T + 300_000),
                device_signature,
                attestation,
                factor: SecondFactorKind::Pin,
                device_time: Timestamp::from_millis(T + 2_000),
                signed_at: Timestamp::from_millis(T + 3_000),
            }),
        )
        .await;
        // A rotation after the signature is not part of this signature's chain.
        append(db, &account.stream(), rotated(KeyRole::Signing, &later)).await;

        let opened = open(&StoreOptions {
            url: db.url().to_owned(),
            pool_size: 2,
        })
        .await
        .unwrap();
        let audit = AuditTree::new(opened.database);
        audit
            .checkpoint(&db.store, &audit_key, "countersign.test", T + 10_000)
            .await
            .unwrap()
            .unwrap();

        let ev = assemble(&db.store, &audit, transaction).await.unwrap();
        assert_eq!(ev.account.signing_public_key.0.to_vec(), public(&current));
        let positions: Vec<u64> = ev
            .account
            .key_rotations
            .iter()
            .map(|r| r.position)
            .collect();
        assert_eq!(positions, [1, 3]);
        let verified = verify_evidence(
            &ev.to_cbor().unwrap(),
            audit_key.verifying_key(),
            &[*sfs.verifying_key()],
            Some(T + 20_000),
        )
        .unwrap();
        assert_eq!(verified.account_id, *account.account_id.as_bytes());
        assert_eq!(verified.app_instance, app_instance);
    }

    countersign_eventstore::on_both_backends!(a_bundle_after_key_rotations_verifies);
}
