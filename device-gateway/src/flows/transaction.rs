//! Transactions on a device: fetching one to show it, its second-factor challenge, signing,
//! declining, and the app's own transactions.
//!
//! Rules enforced here, before any command:
//! - only an account channel whose account is linked to a user, and only an account the
//!   transaction allows ([`Transaction::allows`]): an account of another user, or another
//!   account of the user when the creator named one, is `not_allowed`;
//! - a transaction that ended is `ended`, one past its deadline `expired` (and its expiry is
//!   recorded);
//! - a signature is accepted only with a fresh SFS attestation of the transaction's public
//!   challenge (`evidence::transaction_challenge`, never the login reuse window), and only if
//!   the account's signing key signed exactly this transaction, server, data and text, bound
//!   the attestation's hash, and dated the signature within the attestation's validity. Every
//!   check runs, and the aggregate is asked (without writing), before the attestation's single
//!   use is recorded: a refused signature writes nothing;
//! - a retry of a signature that was recorded answers `done`.

use countersign_commands::Loaded;
use countersign_domain::transaction::{
    CreateSignedTransaction, DEFAULT_TIMEOUT_SECS, RejectTransaction, SignTransaction, Signature,
    Transaction, TransactionCommand, TransactionCreated, TransactionError, TransactionRequest,
    TransactionStatus,
};
use countersign_domain::{
    AccountId, Aggregate, Context, Timestamp, TransactionId, TransactionRef, UserDigest,
};
use countersign_protocol::attestation::AttestationClaims;
use countersign_protocol::device::{
    Answer, Blob, Bytes, DeviceError, ErrorCode, PendingTransaction, TransactionDetails,
};
use countersign_protocol::evidence::{
    SignedTransaction, transaction_challenge, verify_signed_transaction,
};
use sha2::{Digest, Sha256};

use super::{Connection, check_attestation, error, internal, kind_of, refused, use_attestation};

/// The purpose an attestation's single use is recorded for.
const PURPOSE: &str = "transaction";
/// How far before the attestation was issued the device's clock may date its signature.
const DEVICE_CLOCK_SKEW_MS: i64 = 5_000;

/// The account on this channel and its user.
fn signer(conn: &Connection) -> Result<(AccountId, UserDigest), DeviceError> {
    let active = conn.account()?;
    let user = active.user.ok_or_else(|| {
        error(
            ErrorCode::NotAllowed,
            "this account is not linked to a user",
        )
    })?;
    Ok((active.account.account_id, user))
}

fn reference(conn: &Connection, id: &Bytes<16>) -> TransactionRef {
    TransactionRef::new(conn.server, TransactionId::from_bytes(id.0))
}

/// A rule of the transaction aggregate, in the device's codes.
fn device_error(e: &TransactionError) -> DeviceError {
    let code = match e {
        TransactionError::NotFound => ErrorCode::NotFound,
        TransactionError::NotAllowed => ErrorCode::NotAllowed,
        TransactionError::Expired
        | TransactionError::Ended {
            status: TransactionStatus::Expired,
        } => ErrorCode::Expired,
        TransactionError::Ended { .. } => ErrorCode::Ended,
        TransactionError::AlreadyExists => ErrorCode::Conflict,
        TransactionError::Invalid(_) | TransactionError::Mismatch(_) => ErrorCode::Invalid,
    };
    error(code, &e.to_string())
}

async fn load(conn: &Connection, tx: TransactionRef) -> Result<Loaded<Transaction>, DeviceError> {
    conn.gateway
        .0
        .commands
        .transactions
        .load(tx)
        .await
        .map_err(refused)
}

/// The created facts if this account may act on the transaction now (the aggregate's rule,
/// [`Transaction::live`]); a deadline that passed is recorded on the way.
async fn live(
    conn: &Connection,
    tx: TransactionRef,
    state: &Transaction,
    (account, user): (AccountId, UserDigest),
) -> Result<TransactionCreated, DeviceError> {
    match state.live(account, user, conn.gateway.0.clock.now()) {
        Ok(created) => Ok(created.clone()),
        Err(e) => {
            if e == TransactionError::Expired
                && let Err(failed) = conn
                    .gateway
                    .0
                    .commands
                    .transactions
                    .expire(tx, &conn.metadata())
                    .await
            {
                tracing::warn!(error = %failed, "recording a transaction's expiry failed");
            }
            Err(device_error(&e))
        }
    }
}

/// Asks the aggregate without writing, so that a refusal comes before the attestation is
/// spent. Answers whether the command would change anything (nothing: a retry of what was
/// recorded).
fn dry_run(
    state: &Transaction,
    command: TransactionCommand,
    now: Timestamp,
) -> Result<bool, DeviceError> {
    state
        .decide(command, &mut Context::new(now))
        .map(|events| !events.is_empty())
        .map_err(|e| device_error(&e))
}

fn details(created: &TransactionCreated) -> TransactionDetails {
    TransactionDetails {
        transaction_id: Bytes(*created.transaction.transaction_id.as_bytes()),
        data: Blob(created.data.clone()),
        content_type: created.content_type.clone(),
        text: created.text.clone(),
        announce_info: created.announce_info.clone(),
        created_at_ms: created.created_at.as_millis(),
        expires_at_ms: created.expires_at.as_millis(),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `get_transaction`: records that this account's device shows it, and answers it.
pub(super) async fn get(conn: &Connection, id: &Bytes<16>) -> Result<Answer, DeviceError> {
    let me = signer(conn)?;
    let tx = reference(conn, id);
    let loaded = load(conn, tx).await?;
    let created = live(conn, tx, &loaded.state, me).await?;
    conn.gateway
        .0
        .commands
        .transactions
        .present(tx, loaded, me.0, me.1, &conn.metadata())
        .await
        .map_err(refused)?;
    Ok(Answer::Transaction(details(&created)))
}

/// `challenge` for a transaction: the public challenge of the stored data and text.
pub(super) async fn challenge(conn: &Connection, id: &Bytes<16>) -> Result<Answer, DeviceError> {
    let me = signer(conn)?;
    let tx = reference(conn, id);
    let loaded = load(conn, tx).await?;
    let created = live(conn, tx, &loaded.state, me).await?;
    Ok(Answer::Challenge {
        challenge: Bytes(transaction_challenge(
            conn.server.as_bytes(),
            &id.0,
            &created.data_hash,
            &created.text_hash,
        )),
    })
}

/// `reject_transaction`.
pub(super) async fn reject(conn: &Connection, id: &Bytes<16>) -> Result<Answer, DeviceError> {
    let me = signer(conn)?;
    let tx = reference(conn, id);
    let loaded = load(conn, tx).await?;
    let reject = RejectTransaction {
        account_id: me.0,
        user: me.1,
    };
    dry_run(&loaded.state, reject.into(), conn.gateway.0.clock.now())?;
    conn.gateway
        .0
        .commands
        .transactions
        .reject(tx, me.0, me.1, &conn.metadata())
        .await
        .map_err(refused)?;
    Ok(Answer::Done)
}

/// A device signature and an attestation checked against one transaction's facts.
struct Verified {
    claims: AttestationClaims,
    attestation_hash: [u8; 32],
    signature: Signature,
}

/// Every check of a signature over `tx` with these hashes, writing nothing.
async fn verify(
    conn: &Connection,
    tx: TransactionRef,
    (data_hash, text_hash): ([u8; 32], [u8; 32]),
    device_signature: Vec<u8>,
    attestation: Vec<u8>,
) -> Result<Verified, DeviceError> {
    let (account_id, user) = signer(conn)?;
    let challenge = transaction_challenge(
        conn.server.as_bytes(),
        tx.transaction_id.as_bytes(),
        &data_hash,
        &text_hash,
    );
    let (claims, attestation_hash) = check_attestation(conn, &attestation, challenge).await?;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&conn.account()?.signing_public_key)
        .map_err(|e| internal(&e))?;
    let signed = verify_signed_transaction(&device_signature, &key).map_err(|e| {
        error(
            ErrorCode::Invalid,
            &format!("the device signature is refused: {e}"),
        )
    })?;
    check_signed(conn, tx, &signed, (data_hash, text_hash), attestation_hash)?;
    if signed.device_time_ms < claims.issued_at_ms.saturating_sub(DEVICE_CLOCK_SKEW_MS)
        || signed.device_time_ms > claims.expires_at_ms
    {
        return Err(error(
            ErrorCode::Invalid,
            "the device signature is dated outside the attestation's validity",
        ));
    }
    let signature = Signature {
        account_id,
        user,
        data_hash,
        text_hash,
        device_signature,
        attestation,
        factor: kind_of(claims.factor),
        device_time: Timestamp::from_millis(signed.device_time_ms),
    };
    Ok(Verified {
        claims,
        attestation_hash,
        signature,
    })
}

/// The signed payload names this transaction, server, data, text and attestation.
fn check_signed(
    conn: &Connection,
    tx: TransactionRef,
    signed: &SignedTransaction,
    (data_hash, text_hash): ([u8; 32], [u8; 32]),
    attestation_hash: [u8; 32],
) -> Result<(), DeviceError> {
    let mismatch = if signed.transaction_id.0 != *tx.transaction_id.as_bytes() {
        Some("another transaction")
    } else if signed.server_id.0 != *conn.server.as_bytes() {
        Some("another server")
    } else if signed.data_hash.0 != data_hash {
        Some("other data")
    } else if signed.text_hash.0 != text_hash {
        Some("another text")
    } else if signed.attestation_hash.0 != attestation_hash {
        Some("another attestation")
    } else {
        None
    };
    match mismatch {
        Some(what) => Err(error(
            ErrorCode::Invalid,
            &format!("the device signature is over {what} than this one"),
        )),
        None => Ok(()),
    }
}

/// `sign_transaction`.
pub(super) async fn sign(
    conn: &Connection,
    id: &Bytes<16>,
    device_signature: Vec<u8>,
    attestation: Vec<u8>,
) -> Result<Answer, DeviceError> {
    let me = signer(conn)?;
    let tx = reference(conn, id);
    let loaded = load(conn, tx).await?;
    if loaded.state.signed().is_some_and(|s| {
        s.account_id == me.0
            && s.device_signature == device_signature
            && s.attestation == attestation
    }) {
        // A retry of a signature that was recorded (its attestation may have expired since).
        return Ok(Answer::Done);
    }
    let created = live(conn, tx, &loaded.state, me).await?;
    let verified = verify(
        conn,
        tx,
        (created.data_hash, created.text_hash),
        device_signature,
        attestation,
    )
    .await?;
    let command = SignTransaction(verified.signature.clone());
    dry_run(&loaded.state, command.into(), conn.gateway.0.clock.now())?;
    use_attestation(conn, &verified.claims, verified.attestation_hash, PURPOSE).await?;
    conn.gateway
        .0
        .commands
        .transactions
        .sign(tx, loaded, verified.signature, &conn.metadata())
        .await
        .map_err(refused)?;
    tracing::info!(server = %conn.server, account = %me.0, "transaction signed");
    Ok(Answer::Done)
}

/// What the app asks to create and sign at once.
pub(super) struct OwnTransaction {
    pub data: Vec<u8>,
    pub content_type: String,
    pub text: String,
    pub device_signature: Vec<u8>,
    pub attestation: Vec<u8>,
}

/// `sign_own_transaction`: stored only once every check passed, created and signed together.
pub(super) async fn sign_own(
    conn: &Connection,
    id: &Bytes<16>,
    own: OwnTransaction,
) -> Result<Answer, DeviceError> {
    let me = signer(conn)?;
    let tx = reference(conn, id);
    let loaded = load(conn, tx).await?;
    let hashes = (sha256(&own.data), sha256(own.text.as_bytes()));
    let verified = verify(conn, tx, hashes, own.device_signature, own.attestation).await?;
    let command = CreateSignedTransaction {
        request: TransactionRequest {
            transaction: tx,
            user: me.1,
            account_id: Some(me.0),
            data: own.data,
            content_type: own.content_type,
            text: own.text,
            announce_info: None,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        },
        signature: verified.signature,
    };
    // The aggregate decides: an id taken by another transaction is a conflict, the same
    // transaction signed the same way a retry.
    if !dry_run(
        &loaded.state,
        command.clone().into(),
        conn.gateway.0.clock.now(),
    )? {
        return Ok(Answer::Done);
    }
    use_attestation(conn, &verified.claims, verified.attestation_hash, PURPOSE).await?;
    conn.gateway
        .0
        .commands
        .transactions
        .create_signed(command, &conn.metadata())
        .await
        .map_err(refused)?;
    tracing::info!(server = %conn.server, account = %me.0, "own transaction signed");
    Ok(Answer::Done)
}

/// `pending_transactions`: from the transactions read model, once it has seen everything
/// committed before the request (a transaction the device was just told of is listed).
pub(super) async fn pending(conn: &Connection) -> Result<Answer, DeviceError> {
    let (account, user) = signer(conn)?;
    let gateway = &conn.gateway.0;
    let head = gateway
        .store
        .last_position()
        .await
        .map_err(|e| internal(&e))?;
    if let Some(head) = head {
        let caught_up = gateway
            .reads
            .wait_for(head, gateway.config.max_wait)
            .await
            .map_err(|e| internal(&e))?;
        if !caught_up {
            tracing::warn!("the transactions read model lags; listing what it has");
        }
    }
    let rows = gateway
        .reads
        .pending_transactions(
            conn.server,
            user,
            account,
            gateway.clock.now(),
            countersign_protocol::device::MAX_PENDING_TRANSACTIONS,
        )
        .await
        .map_err(|e| internal(&e))?;
    Ok(Answer::Transactions {
        pending: rows
            .into_iter()
            .map(|row| PendingTransaction {
                transaction_id: Bytes(*row.transaction_id.as_bytes()),
                announce_info: row.announce_info,
                expires_at_ms: row.expires_at.as_millis(),
            })
            .collect(),
    })
}
