//! `app_login`: the app logs in to itself (docs/app-login.md). The gateway opens a continuous
//! session for the connected account's user and answers its hsid and a **web nonce**, which
//! the app hands its own backend; the backend reads the session with it like any session
//! nonce (`GET …/sessions/{web_nonce}`, its SSE, `DELETE`).
//!
//! Rules enforced here:
//! - only an account channel, and the account as its stream says now (an upgrade on this
//!   channel counts): a headless account (no second factor yet) or one not linked to a user
//!   is refused with `not_allowed`, and nothing is written;
//! - the ping time is 1..=3600 s (an AppLogin is continuous);
//! - the web nonce is 32 bytes from the OS generator, sent to the device once and dropped:
//!   the session is known by `hsid = HMAC(server secret, "hsid" ‖ base64url(web nonce))`, the
//!   same derivation a business system's nonce gets, so no event, row or log line holds it;
//! - the session is opened (`app_login: true`, meant for the account's user, the server's
//!   session timeout) and confirmed for this account at once (an AppLogin has no confirmation
//!   step), with the connection watching it so a DELETE by the backend reaches the device;
//! - the login itself is `verify_second_factor` then `log_in`, and an AppLogin's `log_in`
//!   needs a second factor verified on that session (no reuse window: see [`super`]'s
//!   `log_in` and the session aggregate).

use base64::Engine as _;
use countersign_domain::session::{MAX_PING_TIME_SECS, SessionEvent};
use countersign_protocol::device::{Answer, Bytes, DeviceError, ErrorCode, Secret};
use zeroize::Zeroizing;

use super::{Connection, error, internal, refused, watching};

/// Opens an AppLogin for this connection's account.
pub(super) async fn open(
    conn: &mut Connection,
    ping_time_secs: u32,
) -> Result<Answer, DeviceError> {
    if !(1..=MAX_PING_TIME_SECS).contains(&ping_time_secs) {
        return Err(error(
            ErrorCode::Invalid,
            "an AppLogin's ping time is 1..=3600 seconds",
        ));
    }
    // The channel's account as the handshake found it, with this channel's upgrade applied; a
    // deleted account's channel is closed by the gateway.
    let active = conn.account()?.clone();
    let account = active.account;
    let gateway = conn.gateway.clone();
    let commands = &gateway.0.commands;
    if active.second_factor.is_none() {
        return Err(error(
            ErrorCode::NotAllowed,
            "an AppLogin needs an account with a second factor: this one is headless, upgrade it first",
        ));
    }
    let user = active.user.ok_or_else(|| {
        error(
            ErrorCode::NotAllowed,
            "this account is not linked to a user",
        )
    })?;
    let mut random = Zeroizing::new([0u8; 32]);
    countersign_commands::random_bytes(random.as_mut_slice()).map_err(|e| internal(&e))?;
    let web_nonce =
        Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random.as_slice()));
    let session = commands
        .sessions
        .session_ref(conn.server, &web_nonce)
        .await
        .map_err(refused)?;
    let metadata = conn.metadata();
    let opened = watching(conn, session, async {
        let opened = commands
            .sessions
            .open_app_login(session, ping_time_secs, account.account_id, user, &metadata)
            .await
            .map_err(refused)?;
        opened
            .events
            .into_iter()
            .find_map(|e| match e {
                SessionEvent::Opened(opened) => Some(opened),
                _ => None,
            })
            .ok_or_else(|| internal(&"a new AppLogin session was open already"))
    })
    .await?;
    // The app may stop the session before it logs in (`abort`), as after a scan.
    conn.scanned.insert(session.hsid);
    tracing::info!(server = %conn.server, account = %account.account_id, "app login opened");
    Ok(Answer::AppLogin {
        hsid: Bytes(*session.hsid.as_bytes()),
        web_nonce: Secret::new(*random),
        expires_at_ms: opened.expires_at.as_millis(),
        ping_time_secs: opened.ping_time_secs,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use base64::Engine as _;
    use countersign_domain::account::RegisterAccount;
    use countersign_domain::second_factor::SecondFactorKind;
    use countersign_domain::server::{ConfigureServer, SecondFactorPolicy};
    use countersign_domain::session::Session;
    use countersign_domain::{AccountId, AccountRef, AppInstanceId, UserDigest};
    use countersign_eventstore::Metadata;
    use countersign_protocol::device::{Notice, RequestBody, SessionEnd};

    use super::super::test_world::{Base, connection, key, settings_now};
    use super::super::{Connection, Identity, handle};
    use super::*;
    use crate::GatewayConfig;

    struct World(Base);

    impl std::ops::Deref for World {
        type Target = Base;
        fn deref(&self) -> &Base {
            &self.0
        }
    }

    impl World {
        /// A server whose policy asks no second factor for logins (an AppLogin asks one all
        /// the same).
        async fn new() -> Self {
            let none = SecondFactorPolicy {
                require_for_login: false,
                login_reuse_window_secs: 300,
                ..SecondFactorPolicy::default()
            };
            let configure = ConfigureServer {
                second_factor: Some(none),
                ..ConfigureServer::default()
            };
            Self(Base::new(GatewayConfig::default(), configure, |log| log).await)
        }

        /// A connection of a new account of a user, with or without a second factor.
        async fn connect(&self, n: u8, factor: Option<SecondFactorKind>) -> Connection {
            let account = AccountRef::new(self.server, AccountId::from_bytes([n; 16]));
            let register = RegisterAccount {
                account,
                app_instance: AppInstanceId::from_bytes([n; 16]),
                user: Some(UserDigest::from_bytes([5; 16])),
                channel_public_key: key(n),
                signing_public_key: key(n + 1),
                second_factor: factor,
            };
            let metadata = Metadata::default();
            self.commands
                .accounts
                .register(register, &metadata)
                .await
                .unwrap();
            let countersign_domain::Account::Active(active) =
                self.commands.accounts.load(account).await.unwrap().state
            else {
                panic!("the account is not active");
            };
            let settings = settings_now(&self.gateway, self.server).await;
            let (id, _notices) = self
                .gateway
                .hub()
                .register(Some((self.server, account.account_id)));
            connection(
                &self.gateway,
                self.server,
                settings,
                Identity::Account(Box::new(active)),
                id,
            )
        }
    }

    #[tokio::test]
    async fn an_app_login_is_opened_for_the_account_and_logs_in_only_with_a_fresh_factor() {
        let world = World::new().await;
        let mut conn = world.connect(0x20, Some(SecondFactorKind::Pin)).await;
        let answer = handle(
            &mut conn,
            RequestBody::AppLogin {
                ping_time_secs: 300,
            },
        )
        .await;
        let Ok(Answer::AppLogin {
            hsid,
            web_nonce,
            ping_time_secs,
            ..
        }) = answer
        else {
            panic!("an AppLogin answer: {answer:?}");
        };
        assert_eq!(ping_time_secs, 300);
        // The backend's read with the web nonce names the same session.
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(web_nonce.expose());
        let session = world
            .commands
            .sessions
            .session_ref(world.server, &text)
            .await
            .unwrap();
        assert_eq!(session.hsid.as_bytes(), &hsid.0);
        let state = world.commands.sessions.load(session).await.unwrap().state;
        let Session::Confirmed { opened, account_id } = &state else {
            panic!("opened and confirmed: {state:?}");
        };
        assert!(opened.app_login);
        assert_eq!(opened.user, Some(UserDigest::from_bytes([5; 16])));
        assert_eq!(*account_id, AccountId::from_bytes([0x20; 16]));

        // The policy asks no factor and a reuse window is set: an AppLogin asks one anyway.
        let refused = handle(&mut conn, RequestBody::LogIn { hsid }).await;
        assert_eq!(
            refused.err().map(|e| e.code),
            Some(ErrorCode::SecondFactorRequired)
        );
        // Another account cannot take it over.
        let mut other = world.connect(0x30, Some(SecondFactorKind::Pin)).await;
        let taken = handle(&mut other, RequestBody::Confirm { hsid }).await;
        assert_eq!(taken.err().map(|e| e.code), Some(ErrorCode::Conflict));

        // The connection hears the backend's DELETE.
        let (watcher, mut notices) = world
            .gateway
            .hub()
            .register(Some((world.server, AccountId::from_bytes([0x20; 16]))));
        conn.id = watcher;
        let again = handle(&mut conn, RequestBody::AppLogin { ping_time_secs: 60 }).await;
        let Ok(Answer::AppLogin { hsid: second, .. }) = again else {
            panic!("{again:?}");
        };
        world.gateway.hub().session_ended(
            world.server,
            countersign_domain::Hsid::from_bytes(second.0),
            SessionEnd::Aborted,
        );
        assert_eq!(
            notices.try_recv().ok(),
            Some(Notice::SessionEnded {
                hsid: second,
                how: SessionEnd::Aborted
            })
        );
    }

    #[tokio::test]
    async fn a_headless_account_or_a_bad_ping_time_is_refused_and_writes_nothing() {
        let world = World::new().await;
        let mut headless = world.connect(0x40, None).await;
        let before = world.store.last_position().await.unwrap();
        let refused = handle(
            &mut headless,
            RequestBody::AppLogin {
                ping_time_secs: 300,
            },
        )
        .await;
        let refused = refused.err().unwrap();
        assert_eq!(refused.code, ErrorCode::NotAllowed);
        assert!(refused.message.contains("upgrade"), "{}", refused.message);
        assert_eq!(world.store.last_position().await.unwrap(), before);
        let mut conn = world.connect(0x50, Some(SecondFactorKind::Pin)).await;
        for ping_time_secs in [0, 3601] {
            let before = world.store.last_position().await.unwrap();
            let refused = handle(&mut conn, RequestBody::AppLogin { ping_time_secs }).await;
            assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::Invalid));
            assert_eq!(world.store.last_position().await.unwrap(), before);
        }
        // A guest may not.
        let mut guest = world.connect(0x60, Some(SecondFactorKind::Pin)).await;
        guest.identity = Identity::Guest {
            channel_key: key(0x60),
        };
        let before = world.store.last_position().await.unwrap();
        let refused = handle(
            &mut guest,
            RequestBody::AppLogin {
                ping_time_secs: 300,
            },
        )
        .await;
        assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::NotAllowed));
        assert_eq!(world.store.last_position().await.unwrap(), before);
    }
}
