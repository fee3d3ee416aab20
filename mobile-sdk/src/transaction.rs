//! Transactions on the app's side: listing the ones waiting, fetching one to show it,
//! approving (signing) or declining it, and signing the app's own.
//!
//! Rules enforced here:
//! - signing always asks the SFS for a fresh attestation, of the transaction's public
//!   challenge (`evidence::transaction_challenge`), computed here from the data and text the
//!   user is shown: a hash the server sent is never trusted, so a server that shows one text
//!   and asks a signature over another gets a signature the gateway refuses;
//! - the device signs, with the account's signing key, exactly the transaction id, server,
//!   data hash, text hash and the attestation's hash, dated by the device's clock;
//! - the app's own transactions get a random id and exist at the server only once signed.

use std::collections::BTreeMap;

use countersign_protocol::attestation::attestation_hash;
use countersign_protocol::device::{Answer, Blob, Bytes, RequestBody};
use countersign_protocol::evidence::{SignedTransaction, sign_transaction, transaction_challenge};
use sha2::{Digest, Sha256};

use crate::error::SdkError;
use crate::model::{PendingTransaction, SecondFactor, TransactionDetails, TransactionReceipt};
use crate::sdk::{Inner, parse_id};
use crate::second_factor;

fn unexpected(request: &str) -> SdkError {
    SdkError::Transport(format!("unexpected answer to {request}"))
}

fn transaction_id(text: &str) -> Result<[u8; 16], SdkError> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| SdkError::InvalidTransaction("a transaction id is 32 hex digits".into()))?;
    Ok(out)
}

/// The account's server id.
fn server_of(inner: &Inner, account_id: &str) -> Result<[u8; 16], SdkError> {
    let server = inner
        .read(|s| s.accounts.get(account_id).map(|a| a.server_id.clone()))?
        .ok_or(SdkError::UnknownAccount)?;
    parse_id(&server)
}

/// `pending_transactions`.
pub(crate) async fn pending(
    inner: &Inner,
    account_id: &str,
) -> Result<Vec<PendingTransaction>, SdkError> {
    match inner
        .account_request(account_id, RequestBody::PendingTransactions)
        .await?
    {
        Answer::Transactions { pending } => Ok(pending
            .into_iter()
            .map(|p| PendingTransaction {
                account_id: account_id.to_owned(),
                transaction_id: hex::encode(p.transaction_id.0),
                announce_info: p.announce_info,
                expires_at_ms: p.expires_at_ms,
            })
            .collect()),
        _ => Err(unexpected("pending_transactions")),
    }
}

/// `get_transaction`.
pub(crate) async fn get(
    inner: &Inner,
    account_id: &str,
    id: &str,
) -> Result<TransactionDetails, SdkError> {
    let id = transaction_id(id)?;
    let server = server_of(inner, account_id)?;
    match inner
        .account_request(
            account_id,
            RequestBody::GetTransaction {
                transaction_id: Bytes(id),
            },
        )
        .await?
    {
        Answer::Transaction(t) if t.transaction_id.0 == id => Ok(TransactionDetails {
            account_id: account_id.to_owned(),
            server_id: hex::encode(server),
            transaction_id: hex::encode(id),
            data: t.data.0,
            content_type: t.content_type,
            text: t.text,
            announce_info: t.announce_info,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
        }),
        _ => Err(unexpected("get_transaction")),
    }
}

/// `reject_transaction`.
pub(crate) async fn reject(inner: &Inner, account_id: &str, id: &str) -> Result<(), SdkError> {
    let id = transaction_id(id)?;
    match inner
        .account_request(
            account_id,
            RequestBody::RejectTransaction {
                transaction_id: Bytes(id),
            },
        )
        .await?
    {
        Answer::Done => Ok(()),
        _ => Err(unexpected("reject_transaction")),
    }
}

/// What the device adds to a signature besides the transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extras {
    pub device_data: BTreeMap<String, String>,
    pub client_data: Option<Vec<u8>>,
}

/// A fresh attestation of the transaction's challenge, and the account's signature binding it.
async fn attest_and_sign(
    inner: &Inner,
    account_id: &str,
    (server, id): ([u8; 16], [u8; 16]),
    (data, text): (&[u8], &str),
    factor: &SecondFactor,
    extras: Extras,
) -> Result<TransactionReceipt, SdkError> {
    let data_hash: [u8; 32] = Sha256::digest(data).into();
    let text_hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    let key = inner
        .read(|s| s.accounts.get(account_id).map(|a| a.signing_key.clone()))?
        .ok_or(SdkError::UnknownAccount)?
        .to_key()?;
    let signing = p256::ecdsa::SigningKey::from_slice(key.expose())
        .map_err(|_| SdkError::Transport("the account key is not a P-256 key".into()))?;
    // Checked before the user is asked for a factor: an app's mistake costs no PIN attempt.
    let mut signed = SignedTransaction {
        transaction_id: Bytes(id),
        server_id: Bytes(server),
        data_hash: Bytes(data_hash),
        text_hash: Bytes(text_hash),
        attestation_hash: Bytes([0; 32]),
        device_time_ms: inner.device_time_ms()?,
        device_data: extras.device_data,
        client_data: extras.client_data,
    };
    sign_transaction(&signed, &signing).map_err(|e| SdkError::InvalidTransaction(e.to_string()))?;
    let thumbprint = second_factor::account_thumbprint(inner, account_id)?;
    let challenge = transaction_challenge(&server, &id, &data_hash, &text_hash);
    let attestation = second_factor::attest_kept(inner, factor, challenge, thumbprint).await?;
    signed.attestation_hash = Bytes(attestation_hash(&attestation));
    signed.device_time_ms = inner.device_time_ms()?;
    let device_signature = sign_transaction(&signed, &signing)
        .map_err(|e| SdkError::InvalidTransaction(e.to_string()))?;
    Ok(TransactionReceipt {
        account_id: account_id.to_owned(),
        transaction_id: hex::encode(id),
        device_signature,
        attestation,
        device_time_ms: signed.device_time_ms,
    })
}

/// `sign_transaction` of a transaction the user was shown.
pub(crate) async fn sign(
    inner: &Inner,
    account_id: &str,
    shown: &TransactionDetails,
    factor: &SecondFactor,
    extras: Extras,
) -> Result<TransactionReceipt, SdkError> {
    let id = transaction_id(&shown.transaction_id)?;
    let server = server_of(inner, account_id)?;
    if shown.server_id != hex::encode(server) {
        return Err(SdkError::InvalidTransaction(
            "the transaction is at another server than the account".into(),
        ));
    }
    let receipt = attest_and_sign(
        inner,
        account_id,
        (server, id),
        (&shown.data, &shown.text),
        factor,
        extras,
    )
    .await?;
    let request = RequestBody::SignTransaction {
        transaction_id: Bytes(id),
        signature: Blob(receipt.device_signature.clone()),
        attestation: Blob(receipt.attestation.clone()),
    };
    match inner.account_request(account_id, request).await? {
        Answer::Done => {
            tracing::info!(account_id, "transaction signed");
            Ok(receipt)
        }
        _ => Err(unexpected("sign_transaction")),
    }
}

/// What the app asks its user to sign on its own initiative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Own {
    pub data: Vec<u8>,
    pub content_type: String,
    pub text: String,
}

/// `sign_own_transaction`: a random id, a fresh attestation, then the server stores it signed.
pub(crate) async fn sign_own(
    inner: &Inner,
    account_id: &str,
    own: Own,
    factor: &SecondFactor,
    extras: Extras,
) -> Result<TransactionReceipt, SdkError> {
    let id = crate::random::bytes::<16>()?;
    let server = server_of(inner, account_id)?;
    let receipt = attest_and_sign(
        inner,
        account_id,
        (server, id),
        (&own.data, &own.text),
        factor,
        extras,
    )
    .await?;
    let request = RequestBody::SignOwnTransaction {
        transaction_id: Bytes(id),
        data: Blob(own.data),
        content_type: own.content_type,
        text: own.text,
        signature: Blob(receipt.device_signature.clone()),
        attestation: Blob(receipt.attestation.clone()),
    };
    match inner.account_request(account_id, request).await? {
        Answer::Done => {
            tracing::info!(account_id, "own transaction signed");
            Ok(receipt)
        }
        _ => Err(unexpected("sign_own_transaction")),
    }
}
