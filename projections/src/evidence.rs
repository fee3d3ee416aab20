//! Assembling a signed transaction's evidence bundle (`docs/evidence.md`) from the log and the
//! audit tree.
//!
//! Rules:
//! - Everything in the bundle comes from stored facts: the transaction's own stream (the data,
//!   text and `transaction.signed`), the signing account's `account.registered`, and the audit
//!   tree's proofs against its newest signed checkpoint. Nothing is recomputed from a read model.
//! - A bundle is only assembled once a checkpoint covers the signing event; before that the
//!   answer is [`EvidenceAssemblyError::NotYetCheckpointed`] (retry after the checkpoint
//!   interval), never a bundle that would not verify.
//! - The events are carried as the audit tree hashed them (`RecordedEvent::canonical_bytes`).

use countersign_domain::account::AccountEvent;
use countersign_domain::transaction::{
    Transaction, TransactionCreated, TransactionEvent, TransactionStatus,
};
use countersign_domain::{AccountRef, Aggregate as _, TransactionRef};
use countersign_eventstore::{Direction, RecordedEvent, SharedStore, StoreError};
use countersign_protocol::device::Bytes;
use countersign_protocol::evidence::{
    AccountProof, EVIDENCE_VERSION, Evidence, TransactionRequest,
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
    let mut events = Vec::new();
    loop {
        let from = events.last().map_or(0, |e: &RecordedEvent| e.version + 1);
        let page = store
            .read_stream(stream, Some(from), Direction::Forwards, 1_000)
            .await?;
        if page.is_empty() {
            return Ok(events);
        }
        events.extend(page);
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
    let enrolment = enrolment_event(store, account).await?;

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
    let enrolment_proof = proof(audit.inclusion_proof(enrolment.0.position, size).await?);

    Ok(Evidence {
        version: EVIDENCE_VERSION,
        transaction: request(transaction, created),
        device_signature: signed.device_signature.clone(),
        attestation: signed.attestation.clone(),
        account: AccountProof {
            account_id: Bytes(*signed.account_id.as_bytes()),
            signing_public_key: Bytes(enrolment.1),
            enrolment_event: enrolment.0.canonical_bytes()?,
            enrolment_position: enrolment.0.position,
            enrolment_proof,
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

/// The account's `account.registered` event and the 65-byte key it enrols.
async fn enrolment_event(
    store: &SharedStore,
    account: AccountRef,
) -> Result<(RecordedEvent, [u8; 65]), EvidenceAssemblyError> {
    let first = store
        .read_stream(&account.stream(), Some(0), Direction::Forwards, 1)
        .await?
        .into_iter()
        .next()
        .ok_or(EvidenceAssemblyError::EnrolmentMissing)?;
    let AccountEvent::Registered(registered) = first.decode::<AccountEvent>()? else {
        return Err(EvidenceAssemblyError::EnrolmentMissing);
    };
    let key: [u8; 65] = registered
        .signing_public_key
        .as_slice()
        .try_into()
        .map_err(|_| EvidenceAssemblyError::EnrolmentMissing)?;
    Ok((first, key))
}
