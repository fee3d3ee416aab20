//! The secure channel: headless enrolment, app data to the server's Data Service, and device
//! data (docs/data-service.md, docs/device-protocol.md).
//!
//! - `enrol_headless` (guest): only when the server's policy allows headless enrolment (read
//!   from the server's stream now, not from a cache: it is a trust decision); at most
//!   [`SecureChannelLimits::headless_per_server`] per server; the account's id is derived
//!   from the server and the channel key, so a retry after a lost answer lands on the same
//!   account and no other key can take it. The account has no user and no second factor.
//! - `send_data` (account): the server's Data Service (none: `data_service_not_configured`,
//!   nothing sent), then the size cap, then the account's token bucket, then one signed POST
//!   ([`crate::data_service`]) with the account id, its userid when it has a user, whether it
//!   is headless, its app instance, the app's request id and the time. The DS's 2xx/4xx
//!   answer goes back to the app; its 5xx, a timeout, a refused connection or an oversize
//!   answer are typed errors. Nothing is written to the log per message: the DS is the
//!   record, and a failed delivery leaves no trace to reconcile. Every outcome is counted
//!   (`countersign_ds_requests_total{outcome}`) and timed.
//! - `set_device_data` (account): `account.device_data_changed` when the data changed; it
//!   takes a token from the same bucket, so an app cannot flood the log by alternating values.
//!
//! The server's signing key is read from the vault once and kept as a [`DsSigner`]; a
//! userid is opened once per user and kept (a user's digest names one userid for ever).
//! Neither, nor the app data, reaches a log line or an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use countersign_domain::account::{DeviceData, RegisterAccount, SetDeviceData};
use countersign_domain::{AccountId, AccountRef, AppInstanceId, ServerId, UserRef};
use countersign_protocol::device::{Answer, Bytes, DeviceError, ErrorCode, Opaque};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use sha2::{Digest as _, Sha256};

use super::{Connection, error, internal, refused};
use crate::Gateway;
use crate::data_service::{
    DataServiceClient, DsError, DsRequest, DsSigner, DsTarget, MAX_DS_REQUEST_BYTES,
};

/// A token bucket's size and refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens when full (the burst).
    pub burst: u32,
    /// Tokens added per second.
    pub per_second: u32,
}

/// How much the secure channel lets one account or one server do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureChannelLimits {
    /// `send_data` and `set_device_data` per account.
    pub per_account: Rate,
    /// Headless enrolments per server (anonymous writes, when the server allows them).
    pub headless_per_server: Rate,
}

impl Default for SecureChannelLimits {
    /// Per account 200 then 100 per second (an app talks to its backend, it does not stream);
    /// per server 100 headless enrolments then 10 per second.
    fn default() -> Self {
        Self {
            per_account: Rate {
                burst: 200,
                per_second: 100,
            },
            headless_per_server: Rate {
                burst: 100,
                per_second: 10,
            },
        }
    }
}

/// Most buckets (or cached userids) kept; past it, full buckets are dropped first.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Thousandths of a token.
    milli: u64,
    at_ms: i64,
}

/// Token buckets by key, in bounded memory, on the gateway's clock.
struct Buckets<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Copy> Buckets<K> {
    fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn cap(&self) -> u64 {
        u64::from(self.rate.burst) * 1000
    }

    fn refilled(&self, mut bucket: Bucket, now_ms: i64) -> Bucket {
        let elapsed = u64::try_from(now_ms.saturating_sub(bucket.at_ms)).unwrap_or(0);
        bucket.milli = bucket
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(self.rate.per_second)))
            .min(self.cap());
        bucket.at_ms = bucket.at_ms.max(now_ms);
        bucket
    }

    /// Takes a token for `key`; `false` when its bucket is empty.
    fn take(&self, key: K, now_ms: i64) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if buckets.len() >= MAX_ENTRIES && !buckets.contains_key(&key) {
            let cap = self.cap();
            buckets.retain(|_, b| self.refilled(*b, now_ms).milli < cap);
            if buckets.len() >= MAX_ENTRIES {
                // Every bucket is in use: forget them all rather than grow without bound (a
                // burst more for each key beats running out of memory).
                buckets.clear();
            }
        }
        let full = Bucket {
            milli: self.cap(),
            at_ms: now_ms,
        };
        let bucket = buckets.entry(key).or_insert(full);
        *bucket = self.refilled(*bucket, now_ms);
        if bucket.milli < 1000 {
            return false;
        }
        bucket.milli -= 1000;
        true
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The secure channel's counters.
#[derive(Clone)]
struct Metrics {
    requests: Family<OutcomeLabels, Counter>,
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        }
    }
}

/// The secure channel's shared state: the DS client, cached signers and userids, the
/// limiters, the metrics.
pub(crate) struct SecureChannel {
    client: DataServiceClient,
    signers: RwLock<HashMap<ServerId, Arc<DsSigner>>>,
    userids: RwLock<HashMap<UserRef, Arc<str>>>,
    accounts: Buckets<(ServerId, AccountId)>,
    headless: Buckets<ServerId>,
    metrics: Metrics,
}

impl SecureChannel {
    pub(crate) fn new(limits: &SecureChannelLimits) -> Self {
        Self {
            client: DataServiceClient::new(),
            signers: RwLock::default(),
            userids: RwLock::default(),
            accounts: Buckets::new(limits.per_account),
            headless: Buckets::new(limits.headless_per_server),
            metrics: Metrics::default(),
        }
    }

    /// Adds the secure channel's metrics to `registry` (names carry the `countersign_` prefix).
    pub(crate) fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "countersign_ds_requests",
            "Secure-channel messages, by outcome: answered (the Data Service's 2xx or 4xx went back to the app), not_configured, too_large, rate_limited, timeout, unavailable, failed (5xx or an oversize answer), not_allowed (refused for this channel), ended (the server or account is gone), internal",
            self.metrics.requests.clone(),
        );
        registry.register(
            "countersign_ds_request_duration_seconds",
            "Time from a send_data request to its answer, Data Service included",
            self.metrics.latency.clone(),
        );
    }
}

fn now_ms(gateway: &Gateway) -> i64 {
    gateway.0.clock.now().as_millis()
}

fn rate_limited() -> DeviceError {
    error(
        ErrorCode::RateLimited,
        "too many requests; slow down and try again",
    )
}

/// The account id a headless enrolment gives a channel key at a server.
fn headless_account_id(server: ServerId, channel_key: &[u8]) -> AccountId {
    let digest = Sha256::new()
        .chain_update(b"countersign/headless-account\0")
        .chain_update(server.as_bytes())
        .chain_update(channel_key)
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    AccountId::from_bytes(id)
}

/// `enrol_headless`: see the module's documentation.
pub(super) async fn enrol_headless(
    conn: &mut Connection,
    signing_public_key: Vec<u8>,
    app_instance: [u8; 16],
) -> Result<Answer, DeviceError> {
    let channel_key = super::enrolling_channel_key(conn)?;
    let gateway = conn.gateway.clone();
    let allowed = gateway
        .active_server_now(conn.server)
        .await
        .map_err(|e| internal(&e))?
        .is_some_and(|s| s.settings.headless_enrolment);
    if !allowed {
        return Err(error(
            ErrorCode::NotAllowed,
            "this server does not allow headless accounts; enrol with a code from the business system",
        ));
    }
    super::check_signing_key(&signing_public_key)?;
    let channel = &gateway.0.secure_channel;
    if !channel.headless.take(conn.server, now_ms(&gateway)) {
        return Err(rate_limited());
    }
    let account_id = headless_account_id(conn.server, &channel_key);
    let account = AccountRef::new(conn.server, account_id);
    let register = RegisterAccount {
        account,
        app_instance: AppInstanceId::from_bytes(app_instance),
        user: None,
        channel_public_key: channel_key.clone(),
        signing_public_key,
        second_factor: None,
    };
    let commands = &gateway.0.commands;
    // A retry after a lost answer lands on the same account, ours if it has our channel key.
    super::register_account(commands, register, &conn.metadata()).await?;
    tracing::info!(server = %conn.server, account = %account_id, "headless account enrolled");
    Ok(Answer::HeadlessEnrolled {
        account_id: Bytes(*account_id.as_bytes()),
    })
}

/// `send_data`: see the module's documentation.
pub(super) async fn send(
    conn: &Connection,
    request_id: [u8; 16],
    data: &[u8],
) -> Result<Answer, DeviceError> {
    let started = Instant::now();
    let result = deliver(conn, request_id, data).await;
    let outcome = match &result {
        Ok(_) => "answered",
        Err(e) => match e.code {
            ErrorCode::DataServiceNotConfigured => "not_configured",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::DataServiceTimeout => "timeout",
            ErrorCode::DataServiceUnavailable => "unavailable",
            ErrorCode::DataServiceFailed => "failed",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::Ended | ErrorCode::NotFound => "ended",
            _ => "internal",
        },
    };
    let metrics = &conn.gateway.0.secure_channel.metrics;
    metrics
        .requests
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    metrics.latency.observe(started.elapsed().as_secs_f64());
    result
}

async fn deliver(
    conn: &Connection,
    request_id: [u8; 16],
    data: &[u8],
) -> Result<Answer, DeviceError> {
    let active = conn.account()?;
    let gateway = &conn.gateway;
    let channel = &gateway.0.secure_channel;
    // Settings as of at most a second ago (the gateway's server cache): a DS URL changed by
    // the administrator takes effect for the next message.
    let server = gateway
        .active_server(conn.server)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| error(ErrorCode::Ended, "the server was deleted"))?;
    let Some(ds) = server.settings.data_service else {
        return Err(error(
            ErrorCode::DataServiceNotConfigured,
            "this server has no data service",
        ));
    };
    if data.len() > MAX_DS_REQUEST_BYTES {
        return Err(error(
            ErrorCode::TooLarge,
            &format!("app data may be at most {MAX_DS_REQUEST_BYTES} bytes"),
        ));
    }
    let now = now_ms(gateway);
    if !channel
        .accounts
        .take((conn.server, active.account.account_id), now)
    {
        return Err(rate_limited());
    }
    let signer = signer(gateway, conn.server).await?;
    let userid = match active.user {
        Some(digest) => Some(
            userid(
                gateway,
                UserRef {
                    server_id: conn.server,
                    digest,
                },
            )
            .await?,
        ),
        None => None,
    };
    let request = DsRequest {
        server_id: conn.server,
        account_id: active.account.account_id,
        userid: userid.as_deref(),
        headless: active.second_factor.is_none(),
        app_instance: active.app_instance,
        request_id,
        created_secs: u64::try_from(now / 1000).unwrap_or(0),
        data,
    };
    let target = DsTarget {
        url: &ds.url,
        timeout: Duration::from_millis(u64::from(ds.timeout_ms)),
    };
    match channel.client.call(&target, &signer, &request).await {
        Ok(answer) => Ok(Answer::Data {
            status: answer.status,
            body: Opaque(answer.body),
        }),
        Err(e) => Err(ds_refusal(conn.server, &e)),
    }
}

/// The app's view of a failed delivery; the kind (never the URL or data) is logged.
fn ds_refusal(server: ServerId, e: &DsError) -> DeviceError {
    tracing::warn!(%server, error = %e, "data service delivery failed");
    match e {
        DsError::Timeout => error(
            ErrorCode::DataServiceTimeout,
            "the data service did not answer in time; retry with the same request id",
        ),
        DsError::Unreachable | DsError::BadUrl => error(
            ErrorCode::DataServiceUnavailable,
            "the data service is unreachable; retry with the same request id",
        ),
        DsError::ServerError { .. } | DsError::AnswerTooLarge => {
            error(ErrorCode::DataServiceFailed, "the data service failed")
        }
        DsError::RequestTooLarge => error(
            ErrorCode::TooLarge,
            &format!("app data may be at most {MAX_DS_REQUEST_BYTES} bytes"),
        ),
        DsError::Key => internal(e),
    }
}

/// The server's signer, made once from its key.
async fn signer(gateway: &Gateway, server: ServerId) -> Result<Arc<DsSigner>, DeviceError> {
    let channel = &gateway.0.secure_channel;
    if let Some(signer) = channel
        .signers
        .read()
        .ok()
        .and_then(|s| s.get(&server).cloned())
    {
        return Ok(signer);
    }
    // The same key the channel's handshake uses, from the gateway's cache of it.
    let key = gateway
        .server_key(server)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| error(ErrorCode::Ended, "the server was deleted"))?;
    let secret = key.expose();
    let signer = Arc::new(DsSigner::new(server, secret).map_err(|e| internal(&e))?);
    if let Ok(mut signers) = channel.signers.write() {
        if signers.len() >= MAX_ENTRIES {
            signers.clear();
        }
        signers.insert(server, signer.clone());
    }
    Ok(signer)
}

/// The user's userid, opened once and kept.
async fn userid(gateway: &Gateway, user: UserRef) -> Result<Arc<str>, DeviceError> {
    let channel = &gateway.0.secure_channel;
    if let Some(userid) = channel
        .userids
        .read()
        .ok()
        .and_then(|u| u.get(&user).cloned())
    {
        return Ok(userid);
    }
    let userid: Arc<str> = super::userid(gateway, user, None).await?.into();
    if let Ok(mut userids) = channel.userids.write() {
        if userids.len() >= MAX_ENTRIES {
            userids.clear();
        }
        userids.insert(user, userid.clone());
    }
    Ok(userid)
}

/// `set_device_data`: see the module's documentation.
pub(super) async fn set_device_data(
    conn: &Connection,
    device_data: DeviceData,
) -> Result<Answer, DeviceError> {
    let account = conn.account()?.account;
    let gateway = &conn.gateway;
    if !gateway
        .0
        .secure_channel
        .accounts
        .take((conn.server, account.account_id), now_ms(gateway))
    {
        return Err(rate_limited());
    }
    gateway
        .0
        .commands
        .accounts
        .set_device_data(account, SetDeviceData { device_data }, &conn.metadata())
        .await
        .map_err(refused)?;
    Ok(Answer::Done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use countersign_domain::server::ConfigureServer;
    use countersign_protocol::device::{Blob, RequestBody};

    use super::super::test_world::{Base, connection, key};
    use super::super::{Identity, handle};
    use super::*;
    use crate::GatewayConfig;

    /// A gateway on a fresh SQLite log, with tight secure-channel limits, and one server.
    struct World(Base);

    impl std::ops::Deref for World {
        type Target = Base;
        fn deref(&self) -> &Base {
            &self.0
        }
    }

    impl World {
        async fn new(headless: bool) -> Self {
            let limits = SecureChannelLimits {
                per_account: Rate {
                    burst: 2,
                    per_second: 0,
                },
                headless_per_server: Rate {
                    burst: 1,
                    per_second: 0,
                },
            };
            let config = GatewayConfig {
                secure_channel: limits,
                ..GatewayConfig::default()
            };
            let configure = ConfigureServer {
                headless_enrolment: Some(headless),
                ..ConfigureServer::default()
            };
            Self(Base::new(config, configure, |log| log).await)
        }

        async fn head(&self) -> Option<u64> {
            self.store.last_position().await.unwrap()
        }

        fn guest(&self, n: u8) -> Connection {
            let settings = countersign_domain::server::ServerSettings::defaults("Bank".into());
            let (id, _notices) = self.gateway.hub().register(None);
            let identity = Identity::Guest {
                channel_key: key(n),
            };
            connection(&self.gateway, self.server, settings, identity, id)
        }

        async fn account(&self, account: AccountId) -> Connection {
            let loaded = self
                .commands
                .accounts
                .load(AccountRef::new(self.server, account))
                .await
                .unwrap();
            let countersign_domain::Account::Active(active) = loaded.state else {
                panic!("the account is not active");
            };
            let mut conn = self.guest(200);
            conn.identity = Identity::Account(Box::new(active));
            conn
        }
    }

    fn enrol_body(n: u8) -> RequestBody {
        RequestBody::EnrolHeadless {
            signing_public_key: Blob(key(n + 100)),
            app_instance: Bytes([n; 16]),
        }
    }

    fn device_data(model: &str) -> RequestBody {
        RequestBody::SetDeviceData {
            model: model.into(),
            os: "Android 15".into(),
            app_version: "1.0".into(),
        }
    }

    #[tokio::test]
    async fn headless_enrolment_follows_the_policy_and_the_server_limit() {
        let closed = World::new(false).await;
        let head = closed.head().await;
        let refused = handle(&mut closed.guest(1), enrol_body(1))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::NotAllowed);
        assert_eq!(
            closed.head().await,
            head,
            "a refused enrolment writes nothing"
        );

        let world = World::new(true).await;
        let mut guest = world.guest(1);
        let Answer::HeadlessEnrolled { account_id } =
            handle(&mut guest, enrol_body(1)).await.unwrap()
        else {
            panic!("a headless enrolment");
        };
        let head = world.head().await;
        // The burst (1) is spent: a second device is refused, nothing written.
        let limited = handle(&mut world.guest(2), enrol_body(2))
            .await
            .unwrap_err();
        assert_eq!(limited.code, ErrorCode::RateLimited);
        assert_eq!(world.head().await, head);
        // An account's channel may not enrol.
        let mut account = world.account(AccountId::from_bytes(account_id.0)).await;
        let refused = handle(&mut account, enrol_body(3)).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::NotAllowed);
        // The account has no user and no second factor.
        let active = account.account().unwrap();
        assert_eq!((active.user, active.second_factor), (None, None));
    }

    #[tokio::test]
    async fn the_account_limit_covers_device_data_and_app_data() {
        let world = World::new(true).await;
        let Answer::HeadlessEnrolled { account_id } =
            handle(&mut world.guest(1), enrol_body(1)).await.unwrap()
        else {
            panic!("a headless enrolment");
        };
        let mut conn = world.account(AccountId::from_bytes(account_id.0)).await;
        // No Data Service: refused before the limit is touched.
        let unconfigured = handle(
            &mut conn,
            RequestBody::SendData {
                request_id: Bytes([1; 16]),
                data: Opaque(b"x".to_vec()),
            },
        )
        .await
        .unwrap_err();
        assert_eq!(unconfigured.code, ErrorCode::DataServiceNotConfigured);
        handle(&mut conn, device_data("Pixel 8")).await.unwrap();
        handle(&mut conn, device_data("Pixel 9")).await.unwrap();
        let head = world.head().await;
        let limited = handle(&mut conn, device_data("Pixel 10"))
            .await
            .unwrap_err();
        assert_eq!(limited.code, ErrorCode::RateLimited);
        assert_eq!(world.head().await, head, "a limited request writes nothing");
        let events = world
            .store
            .read_all(0, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "account.device_data_changed")
            .count();
        assert_eq!(events, 2);
        let counted = world
            .gateway
            .0
            .secure_channel
            .metrics
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: "not_configured",
            })
            .get();
        assert_eq!(counted, 1);
    }

    const RATE: Rate = Rate {
        burst: 3,
        per_second: 2,
    };

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let buckets = Buckets::new(RATE);
        assert_eq!((0..5).filter(|_| buckets.take(1u8, 0)).count(), 3);
        assert!(!buckets.take(1, 499));
        assert!(buckets.take(1, 500), "2 per second: one after 500 ms");
        assert!(!buckets.take(1, 500));
        assert!(buckets.take(2, 500), "another key has its own bucket");
        // A long pause refills to the burst, not beyond.
        assert_eq!((0..5).filter(|_| buckets.take(1, 60_000)).count(), 3);
        // A clock going back never adds tokens.
        assert!(!buckets.take(1, 0));
    }

    #[test]
    fn headless_account_ids_depend_on_server_and_key() {
        let (a, b) = (ServerId::from_bytes([1; 16]), ServerId::from_bytes([2; 16]));
        assert_eq!(headless_account_id(a, b"k1"), headless_account_id(a, b"k1"));
        assert_ne!(headless_account_id(a, b"k1"), headless_account_id(a, b"k2"));
        assert_ne!(headless_account_id(a, b"k1"), headless_account_id(b, b"k1"));
    }

    #[test]
    fn delivery_failures_map_to_their_codes() {
        let server = ServerId::from_bytes([1; 16]);
        let code = |e: DsError| ds_refusal(server, &e).code;
        assert_eq!(code(DsError::Timeout), ErrorCode::DataServiceTimeout);
        assert_eq!(
            code(DsError::Unreachable),
            ErrorCode::DataServiceUnavailable
        );
        assert_eq!(
            code(DsError::ServerError { status: 503 }),
            ErrorCode::DataServiceFailed
        );
        assert_eq!(code(DsError::AnswerTooLarge), ErrorCode::DataServiceFailed);
        assert_eq!(code(DsError::RequestTooLarge), ErrorCode::TooLarge);
        assert_eq!(code(DsError::Key), ErrorCode::Internal);
    }
}
