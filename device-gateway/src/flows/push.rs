//! `register_push`: an account names the Message Center mailbox its push messages go to and
//! the key they are sealed to (`docs/message-center.md`).
//!
//! Rules: only an account channel may register; the MC must be one the deployment trusts
//! ([`GatewayConfig::message_centers`](crate::GatewayConfig)), so a device cannot make the NS
//! post to an address of its choosing; the push key must be an uncompressed P-256 point (the
//! aggregate checks it). The MC token is a bearer secret: it is sealed in the key vault under
//! a reference derived from its hash (so registering the same token again is idempotent), and
//! only that reference reaches the event.

use countersign_domain::account::RegisterPush;
use countersign_protocol::device::{Answer, DeviceError, ErrorCode, Secret};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use sha2::{Digest as _, Sha256};

use super::{Connection, error, internal, refused};

/// The vault reference of an account's MC token.
fn token_ref(conn: &Connection, account: countersign_domain::AccountId, token: &[u8]) -> String {
    let digest = Sha256::digest(token);
    format!(
        "push/{}/{}/{}",
        conn.server,
        account,
        hex::encode(digest.get(..16).unwrap_or_default())
    )
}

/// Records the account's push registration.
pub(super) async fn register(
    conn: &mut Connection,
    mc_key: &[u8],
    mc_token: Secret<32>,
    push_public_key: &[u8],
) -> Result<Answer, DeviceError> {
    let account = conn.account()?.account;
    let key = p256::PublicKey::from_sec1_bytes(mc_key)
        .map_err(|_| error(ErrorCode::Invalid, "mc_key is not a P-256 point"))?;
    let key = key.as_affine().to_sec1_point(false).as_bytes().to_vec();
    let gateway = &conn.gateway.0;
    let Some(mc) = gateway
        .config
        .message_centers
        .iter()
        .find(|mc| mc.key == key)
    else {
        return Err(error(
            ErrorCode::NotAllowed,
            "this server does not send push messages through that Message Center",
        ));
    };
    let token = mc_token.expose();
    let reference = token_ref(conn, account.account_id, token);
    gateway
        .vault
        .put_if_absent(&reference, token)
        .await
        .map_err(|e| internal(&e))?;
    let command = RegisterPush {
        mc_key_id: mc.key_id(),
        push_public_key: push_public_key.to_vec(),
        token_ref: reference,
    };
    gateway
        .commands
        .accounts
        .register_push(account, command, &conn.metadata())
        .await
        .map_err(refused)?;
    Ok(Answer::Done)
}
