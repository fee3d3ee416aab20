//! The IdP's log follower: tells relying parties, over their back channels, what happened to
//! the logins they hold tokens for.
//!
//! - **Back-channel logout** (OpenID Connect Back-Channel Logout 1.0): when a login session
//!   that a client received tokens for logs out, for any reason (the user in the app, the
//!   business system, RP-initiated logout, a missed ping), each such client with a
//!   `backchannel_logout_uri` gets a logout token: ES256 JWT (`typ` `logout+jwt`) with `iss`,
//!   `aud`, `iat`, `exp` (`iat` + [`LOGOUT_TOKEN_LIFETIME_SECS`]), `jti`, `sid`, `sub` and the
//!   `events` claim, never a `nonce`, posted as the form field `logout_token`.
//! - **CIBA ping** (OpenID CIBA Core 1.0 §10.2): when the push login of a ping-mode CIBA request
//!   is decided (logged in, declined, failed or expired), the client's notification endpoint
//!   gets `{"auth_req_id": …}` with `Authorization: Bearer <client_notification_token>`.
//!
//! What it keeps: from `grant.code_issued` and the `grant.tokens_issued` of CIBA grants, which
//! clients hold tokens for which session (`idp_session_clients`); from `grant.ciba_requested`
//! in ping mode, which session answers which request (`idp_ciba_pings`). Both are written
//! while reading, idempotently, so reading an event again changes nothing. On the very first
//! start it reads the log from its beginning (nothing is owed for events before any grant, so
//! that only costs one pass).
//!
//! Rules: every delivery is retried with backoff (1 s doubling to 60 s) on a network failure,
//! a timeout ([`ATTEMPT_TIMEOUT`] per attempt), a 5xx, 408 or 429, and given up after
//! [`GIVE_UP_AFTER`] (logged); another answer outside 2xx is final (logged). Redirects are
//! not followed. A token is signed again for each attempt, so none goes out expired. The
//! checkpoint (`idp_follower_checkpoint`) moves only past events whose deliveries are all
//! finished, so a crash sends again rather than loses; a receiver may see a logout token or a
//! ping twice (each logout token has its own `jti`). No token, notification token, client
//! secret or URL (which may carry a secret in its query) reaches a log line, an error or a
//! metric: deliveries are logged by server and client id only. Counted in
//! `countersign_idp_deliveries_total{kind,outcome}`.
//!
//! Instances that run the api role each run one; with several, each delivers (receivers must
//! tolerate duplicates, which the specs allow).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use countersign_domain::grant::{GrantCibaRequested, GrantEvent};
use countersign_domain::{GrantId, GrantRef, Hsid, OidcClientId, ServerId, SessionRef, UserDigest};
use countersign_eventstore::follow::{AbortOnDrop, Progress, lock, scoped};
use countersign_eventstore::{Database, Direction, RecordedEvent, with_pool};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::state::IdpState;

/// Events read from the log per round.
const BATCH: usize = 500;
/// Deliveries in flight at once.
const IN_FLIGHT: usize = 32;
/// Deliveries worked out and waiting for a slot.
const QUEUED: usize = 4 * BATCH;
/// The checkpoint row's name.
const CHECKPOINT: &str = "backchannel";
/// Longest one delivery attempt may take: connecting, sending, reading the answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause before a retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a delivery is tried before it is given up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// Seconds a logout token is valid.
pub const LOGOUT_TOKEN_LIFETIME_SECS: i64 = 120;
/// How often the follower looks at the log when no commit woke it (another process's SQLite
/// commits wake nobody).
const POLL: Duration = Duration::from_millis(500);
/// The back-channel logout event's name in the `events` claim.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Why a round of the follower stopped (it starts again after a pause).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] countersign_eventstore::StoreError),
    /// Loading an aggregate failed.
    #[error(transparent)]
    Command(#[from] countersign_commands::CommandError),
    /// The follower's tables.
    #[error("idp follower tables: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a delivery failed on, for the log: never a URL, a token or a body.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("the receiver could not be reached")]
    Unreachable,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the receiver answered {0}")]
    Status(u16),
    #[error("the receiver's URL is not usable")]
    BadUrl,
    #[error("the message could not be made: {0}")]
    Build(String),
}

/// Labels of the deliveries counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    /// `logout` or `ping`.
    kind: &'static str,
    /// `delivered`, `retry`, `refused` (a final answer outside 2xx, or nothing to send to),
    /// `gave_up` (still failing after [`GIVE_UP_AFTER`]).
    outcome: &'static str,
}

/// One message owed to a client.
#[derive(Debug, Clone)]
enum Delivery {
    /// A logout token for the session.
    Logout {
        session: SessionRef,
        client_id: OidcClientId,
        user: UserDigest,
    },
    /// A CIBA ping for the grant.
    Ping {
        grant: GrantRef,
        request: Box<GrantCibaRequested>,
    },
}

impl Delivery {
    const fn kind(&self) -> &'static str {
        match self {
            Self::Logout { .. } => "logout",
            Self::Ping { .. } => "ping",
        }
    }

    const fn server(&self) -> ServerId {
        match self {
            Self::Logout { session, .. } => session.server_id,
            Self::Ping { grant, .. } => grant.server_id,
        }
    }

    const fn client_id(&self) -> OidcClientId {
        match self {
            Self::Logout { client_id, .. } => *client_id,
            Self::Ping { request, .. } => request.client_id,
        }
    }
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Final: a refusal, or nothing to send to (the client was removed, or has no endpoint).
    Refused(DeliveryError),
    /// Worth another try.
    Again(DeliveryError),
}

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The follower. Cheap to clone.
#[derive(Clone)]
pub struct Backchannel(Arc<Inner>);

struct Inner {
    state: IdpState,
    http: Option<Http>,
    deliveries: Family<DeliveryLabels, Counter>,
    seen: std::sync::Mutex<Seen>,
}

/// What the follower learnt from events it read this run, so that the common events cost no
/// query: the grants it saw open (code or CIBA) and the (session, client) pairs it stored.
/// Bounded: when full it forgets all, and a miss asks the database as before.
#[derive(Default)]
struct Seen {
    code_grants: std::collections::HashSet<GrantId>,
    remembered: std::collections::HashSet<(SessionRef, OidcClientId)>,
}

/// Most entries [`Seen`] keeps of each kind.
const SEEN_MAX: usize = 100_000;

impl Seen {
    fn code_grant(&mut self, grant: GrantId) {
        if self.code_grants.len() >= SEEN_MAX {
            self.code_grants.clear();
        }
        self.code_grants.insert(grant);
    }

    /// Whether the pair is new to this run (and now known).
    fn remember(&mut self, session: SessionRef, client: OidcClientId) -> bool {
        if self.remembered.len() >= SEEN_MAX {
            self.remembered.clear();
        }
        self.remembered.insert((session, client))
    }
}

impl std::fmt::Debug for Backchannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backchannel").finish_non_exhaustive()
    }
}

impl Backchannel {
    /// A follower for the IdP of `state` (its store, database, read models and keys).
    #[must_use]
    pub fn new(state: IdpState) -> Self {
        Self(Arc::new(Inner {
            state,
            http: http_client(),
            deliveries: Family::default(),
            seen: std::sync::Mutex::new(Seen::default()),
        }))
    }

    /// Registers `countersign_idp_deliveries_total{kind,outcome}`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "countersign_idp_deliveries",
            "Back-channel logout tokens and CIBA ping notifications sent to relying parties, by kind and outcome",
            self.0.deliveries.clone(),
        );
    }

    /// Starts [`Backchannel::run`] on the runtime; it ends when `stop` turns `true` or its
    /// sender is dropped.
    pub fn spawn(state: IdpState, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let follower = Self::new(state);
        tokio::spawn(async move { follower.run(stop).await })
    }

    /// Follows the log from the checkpoint until `stop` turns `true` (or its sender is
    /// dropped); restarts a round after a failure. Deliveries in flight when it stops are
    /// abandoned: the checkpoint is before them, so the next start sends them again.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        // After a failed round (the database away, say), wait before the next: 1 s, doubling
        // to 30 s while rounds keep failing at once; a round that ran a minute starts over.
        let mut pause = Duration::from_secs(1);
        loop {
            if *stop.borrow() {
                return;
            }
            let round = Instant::now();
            tokio::select! {
                ended = self.follow() => {
                    match ended {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::error!(%error, "idp back-channel follower failed; restarting");
                        }
                    }
                }
                () = stopped(&mut stop) => return,
            }
            if round.elapsed() > Duration::from_secs(60) {
                pause = Duration::from_secs(1);
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stopped(&mut stop) => return,
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    fn database(&self) -> &Database {
        self.0.state.api().reads().database()
    }

    async fn follow(&self) -> Result<(), FollowError> {
        let store = self.0.state.api().store().clone();
        let mut next = self.checkpoint().await?.unwrap_or(0);
        let progress = Arc::new(std::sync::Mutex::new(Progress::new(next)));
        let (queue, queued) = tokio::sync::mpsc::channel::<(u64, Delivery)>(QUEUED);
        // Aborted with this round: a restart delivers again from the checkpoint.
        let sender = AbortOnDrop(tokio::spawn(
            self.clone().deliver_all(queued, Arc::clone(&progress)),
        ));
        let mut saved = next;
        let mut head = store.head();
        loop {
            head.borrow_and_update();
            let events = store.read_all(next, BATCH).await?;
            let Some(last) = events.last() else {
                saved = self.save_progress(&progress, saved).await?;
                tokio::select! {
                    changed = head.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            };
            let reached = last.position + 1;
            for event in &events {
                let owed = self.work_for(event).await?;
                lock(&progress).expect(event.position, owed.len());
                for delivery in owed {
                    if queue.send((event.position, delivery)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            lock(&progress).read_to(reached);
            if sender.0.is_finished() {
                return Ok(());
            }
            saved = self.save_progress(&progress, saved).await?;
            next = reached;
        }
    }

    /// What one event teaches the follower, and the deliveries it calls for.
    async fn work_for(&self, event: &RecordedEvent) -> Result<Vec<Delivery>, FollowError> {
        if let Some((server, grant_id)) = scoped(&event.stream, "grant-")
            .and_then(|(s, g)| Some((ServerId::parse_hex(s).ok()?, GrantId::parse_hex(g).ok()?)))
        {
            let grant = GrantRef::new(server, grant_id);
            return match event.event_type.as_str() {
                "grant.code_issued" => {
                    if let GrantEvent::CodeIssued(code) = event.decode::<GrantEvent>()? {
                        lock(&self.0.seen).code_grant(grant_id);
                        self.remember_client(code.session, code.client_id, code.user)
                            .await?;
                    }
                    Ok(Vec::new())
                }
                "grant.tokens_issued" => {
                    // Only CIBA grants: a code grant's client was remembered at its code.
                    if lock(&self.0.seen).code_grants.contains(&grant_id) {
                        return Ok(Vec::new());
                    }
                    if let Some(request) = self.ciba_request(&event.stream).await? {
                        self.remember_client(request.session, request.client_id, request.user)
                            .await?;
                    }
                    Ok(Vec::new())
                }
                "grant.ciba_requested" => match event.decode::<GrantEvent>()? {
                    GrantEvent::CibaRequested(request) if request.ping => {
                        self.remember_ping(request.session, grant_id).await?;
                        // The phone may have answered before the request was recorded: then
                        // the session's decision is earlier in the log and owed now.
                        if self.decided_before(request.session, event.position).await? {
                            Ok(vec![Delivery::Ping {
                                grant,
                                request: Box::new(request),
                            }])
                        } else {
                            Ok(Vec::new())
                        }
                    }
                    _ => Ok(Vec::new()),
                },
                _ => Ok(Vec::new()),
            };
        }
        let decided = matches!(
            event.event_type.as_str(),
            "session.logged_in" | "session.aborted" | "session.failed" | "session.expired"
        );
        let logged_out = event.event_type == "session.logged_out";
        if !(decided || logged_out) {
            return Ok(Vec::new());
        }
        let Some(session) = scoped(&event.stream, "session-").and_then(|(s, h)| {
            Some(SessionRef::new(
                ServerId::parse_hex(s).ok()?,
                Hsid::parse_hex(h).ok()?,
            ))
        }) else {
            return Ok(Vec::new());
        };
        if logged_out {
            return Ok(self
                .clients_of(session)
                .await?
                .into_iter()
                .map(|(client_id, user)| Delivery::Logout {
                    session,
                    client_id,
                    user,
                })
                .collect());
        }
        let mut owed = Vec::new();
        for grant_id in self.pings_of(session).await? {
            let grant = GrantRef::new(session.server_id, grant_id);
            if let Some(request) = self.ciba_request(&grant.stream()).await? {
                owed.push(Delivery::Ping {
                    grant,
                    request: Box::new(request),
                });
            }
        }
        Ok(owed)
    }

    /// The CIBA request a grant stream opens with; `None` for a code grant.
    async fn ciba_request(&self, stream: &str) -> Result<Option<GrantCibaRequested>, FollowError> {
        let first = self
            .0
            .state
            .api()
            .store()
            .read_stream(stream, Some(0), Direction::Forwards, 1)
            .await?;
        let Some(first) = first.first() else {
            return Ok(None);
        };
        if first.event_type != "grant.ciba_requested" {
            return Ok(None);
        }
        Ok(match first.decode::<GrantEvent>()? {
            GrantEvent::CibaRequested(request) => Some(request),
            _ => None,
        })
    }

    /// Whether the session was decided (logged in, aborted, failed, expired) at a position
    /// before `position`.
    async fn decided_before(
        &self,
        session: SessionRef,
        position: u64,
    ) -> Result<bool, FollowError> {
        let store = self.0.state.api().store();
        let mut from = 0;
        loop {
            let page = store
                .read_stream(&session.stream(), Some(from), Direction::Forwards, 100)
                .await?;
            let Some(last) = page.last() else {
                return Ok(false);
            };
            from = last.version + 1;
            for recorded in &page {
                if recorded.position >= position {
                    return Ok(false);
                }
                if matches!(
                    recorded.event_type.as_str(),
                    "session.logged_in" | "session.aborted" | "session.failed" | "session.expired"
                ) {
                    return Ok(true);
                }
            }
        }
    }

    async fn remember_client(
        &self,
        session: SessionRef,
        client: OidcClientId,
        user: UserDigest,
    ) -> Result<(), FollowError> {
        // Each SSO authorization is a code of the same session and client: one row says it.
        if !lock(&self.0.seen).remember(session, client) {
            return Ok(());
        }
        with_pool!(self.database(), pool => {
            sqlx::query(
                "INSERT INTO idp_session_clients (server_id, hsid, client_id, user_digest) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(session.server_id.as_bytes().to_vec())
            .bind(session.hsid.as_bytes().to_vec())
            .bind(client.as_bytes().to_vec())
            .bind(user.as_bytes().to_vec())
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    async fn remember_ping(&self, session: SessionRef, grant: GrantId) -> Result<(), FollowError> {
        with_pool!(self.database(), pool => {
            sqlx::query(
                "INSERT INTO idp_ciba_pings (server_id, hsid, grant_id) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(session.server_id.as_bytes().to_vec())
            .bind(session.hsid.as_bytes().to_vec())
            .bind(grant.as_bytes().to_vec())
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    /// The clients that hold tokens for the session, with its user.
    async fn clients_of(
        &self,
        session: SessionRef,
    ) -> Result<Vec<(OidcClientId, UserDigest)>, FollowError> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = with_pool!(self.database(), pool => {
            sqlx::query_as(
                "SELECT client_id, user_digest FROM idp_session_clients \
                 WHERE server_id = $1 AND hsid = $2 ORDER BY client_id",
            )
            .bind(session.server_id.as_bytes().to_vec())
            .bind(session.hsid.as_bytes().to_vec())
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(client, user)| {
                Some((
                    OidcClientId::from_bytes(client.try_into().ok()?),
                    UserDigest::from_bytes(user.try_into().ok()?),
                ))
            })
            .collect())
    }

    /// The ping-mode CIBA requests the session answers.
    async fn pings_of(&self, session: SessionRef) -> Result<Vec<GrantId>, FollowError> {
        let rows: Vec<(Vec<u8>,)> = with_pool!(self.database(), pool => {
            sqlx::query_as(
                "SELECT grant_id FROM idp_ciba_pings WHERE server_id = $1 AND hsid = $2 \
                 ORDER BY grant_id",
            )
            .bind(session.server_id.as_bytes().to_vec())
            .bind(session.hsid.as_bytes().to_vec())
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(grant,)| Some(GrantId::from_bytes(grant.try_into().ok()?)))
            .collect())
    }

    /// Delivers the queued messages, [`IN_FLIGHT`] at once, each until it is delivered,
    /// refused for good, or given up; marks each done in `progress`.
    async fn deliver_all(
        self,
        queued: tokio::sync::mpsc::Receiver<(u64, Delivery)>,
        progress: Arc<std::sync::Mutex<Progress>>,
    ) {
        use futures::StreamExt as _;
        let mut queued = queued;
        futures::stream::poll_fn(move |cx| queued.poll_recv(cx))
            .map(|(position, delivery)| {
                let follower = self.clone();
                async move {
                    follower.deliver_until_done(&delivery).await;
                    position
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|position| {
                lock(&progress).finished(position);
                async {}
            })
            .await;
    }

    /// Delivers one message, retrying with backoff for up to [`GIVE_UP_AFTER`].
    async fn deliver_until_done(&self, delivery: &Delivery) {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let kind = delivery.kind();
        let server = delivery.server().to_string();
        let client = delivery.client_id().to_string();
        loop {
            match self.attempt(delivery).await {
                Attempt::Delivered => {
                    self.count(kind, "delivered");
                    tracing::debug!(kind, %server, %client, "back-channel message delivered");
                    return;
                }
                Attempt::Refused(error) => {
                    self.count(kind, "refused");
                    tracing::warn!(kind, %server, %client, %error, "back-channel message refused; not sent again");
                    return;
                }
                Attempt::Again(error) => {
                    if started.elapsed() + backoff > GIVE_UP_AFTER {
                        self.count(kind, "gave_up");
                        tracing::warn!(
                            kind, %server, %client, %error,
                            "back-channel message given up after {} s of retries",
                            GIVE_UP_AFTER.as_secs()
                        );
                        return;
                    }
                    self.count(kind, "retry");
                    tracing::info!(kind, %server, %client, %error, retry_in_ms = backoff.as_millis() as u64, "back-channel message not delivered; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.0
            .deliveries
            .get_or_create(&DeliveryLabels { kind, outcome })
            .inc();
        if outcome == "delivered" {
            self.0.state.count_delivered();
        }
    }

    /// One attempt: the client's current endpoint (a removed client, or one without an
    /// endpoint, is owed nothing), a fresh message, one POST.
    async fn attempt(&self, delivery: &Delivery) -> Attempt {
        let server = delivery.server();
        let client = match self
            .0
            .state
            .api()
            .reads()
            .oidc_client(server, delivery.client_id())
            .await
        {
            Ok(Some(client)) => client,
            Ok(None) => return Attempt::Refused(DeliveryError::BadUrl),
            Err(error) => return Attempt::Again(DeliveryError::Build(error.to_string())),
        };
        let built = match delivery {
            Delivery::Logout { session, user, .. } => {
                let Some(uri) = client.settings.backchannel_logout_uri.clone() else {
                    return Attempt::Refused(DeliveryError::BadUrl);
                };
                self.logout_request(&uri, *session, delivery.client_id(), *user)
                    .await
            }
            Delivery::Ping { grant, request } => {
                let Some(uri) = client
                    .settings
                    .ciba
                    .as_ref()
                    .and_then(|c| c.notification_endpoint.clone())
                else {
                    return Attempt::Refused(DeliveryError::BadUrl);
                };
                self.ping_request(&uri, *grant, request).await
            }
        };
        let request = match built {
            Ok(request) => request,
            Err(error @ DeliveryError::BadUrl) => return Attempt::Refused(error),
            Err(error) => return Attempt::Again(error),
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.send(request)).await {
            Err(_) => Attempt::Again(DeliveryError::Timeout(ATTEMPT_TIMEOUT)),
            Ok(Err(error)) => Attempt::Again(error),
            Ok(Ok(status)) if (200..300).contains(&status) => Attempt::Delivered,
            Ok(Ok(status)) if status >= 500 || status == 408 || status == 429 => {
                Attempt::Again(DeliveryError::Status(status))
            }
            Ok(Ok(status)) => Attempt::Refused(DeliveryError::Status(status)),
        }
    }

    /// `POST uri` with `logout_token=…` (a new token, signed now).
    async fn logout_request(
        &self,
        uri: &str,
        session: SessionRef,
        client: OidcClientId,
        user: UserDigest,
    ) -> Result<hyper::Request<Full<Bytes>>, DeliveryError> {
        let uri = checked_uri(uri)?;
        let token = self.logout_token(session, client, user).await?;
        let body = zeroize::Zeroizing::new(format!("logout_token={}", token.as_str()));
        hyper::Request::post(uri)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|_| DeliveryError::Build("request".into()))
    }

    /// The logout token for `client` about `session`.
    async fn logout_token(
        &self,
        session: SessionRef,
        client: OidcClientId,
        user: UserDigest,
    ) -> Result<zeroize::Zeroizing<String>, DeliveryError> {
        let state = &self.0.state;
        let server = session.server_id;
        let now_secs = state.api().clock().now().as_millis().div_euclid(1000);
        let mut jti = [0u8; 16];
        countersign_commands::random_bytes(&mut jti)
            .map_err(|e| DeliveryError::Build(e.to_string()))?;
        let sub = state
            .api()
            .commands()
            .grants
            .subject(server, user)
            .await
            .map_err(|e| DeliveryError::Build(e.to_string()))?;
        let claims = serde_json::json!({
            "iss": state.issuer(server),
            "aud": client.to_string(),
            "iat": now_secs,
            "exp": now_secs + LOGOUT_TOKEN_LIFETIME_SECS,
            "jti": b64(&jti),
            "sid": b64(session.hsid.as_bytes()),
            "sub": sub,
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        let signer = state
            .keys()
            .signer(server)
            .await
            .map_err(|e| DeliveryError::Build(e.to_string()))?;
        crate::jwt::sign_typed(&signer, "logout+jwt", &claims)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| DeliveryError::Build(e.to_string()))
    }

    /// `POST uri` with the client's bearer token and `{"auth_req_id": …}`.
    async fn ping_request(
        &self,
        uri: &str,
        grant: GrantRef,
        request: &GrantCibaRequested,
    ) -> Result<hyper::Request<Full<Bytes>>, DeliveryError> {
        let uri = checked_uri(uri)?;
        let state = &self.0.state;
        let Some(sealed) = &request.notification_token else {
            return Err(DeliveryError::Build("no notification token".into()));
        };
        let grants = &state.api().commands().grants;
        let token = grants
            .open_notification_token(grant, sealed)
            .await
            .map_err(|e| DeliveryError::Build(e.to_string()))?;
        let auth_req_id = grants
            .ciba_auth_req_id(grant)
            .await
            .map_err(|e| DeliveryError::Build(e.to_string()))?;
        let body = zeroize::Zeroizing::new(
            serde_json::json!({ "auth_req_id": auth_req_id.expose() }).to_string(),
        );
        let bearer = zeroize::Zeroizing::new(format!("Bearer {}", token.as_str()));
        let mut authorization = hyper::header::HeaderValue::from_str(&bearer)
            .map_err(|_| DeliveryError::Build("notification token".into()))?;
        authorization.set_sensitive(true);
        hyper::Request::post(uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .header(hyper::header::AUTHORIZATION, authorization)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|_| DeliveryError::Build("request".into()))
    }

    /// Sends; answers the status (the body is read and dropped, so the connection is reused).
    async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<u16, DeliveryError> {
        use http_body_util::BodyExt as _;
        // hyper's errors may name the host; only their kind is kept.
        let http = self.0.http.as_ref().ok_or(DeliveryError::Unreachable)?;
        let response = http
            .request(request)
            .await
            .map_err(|_| DeliveryError::Unreachable)?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut read = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(chunk) = frame.into_data() {
                read += chunk.len();
                if read > 64 * 1024 {
                    break;
                }
            }
        }
        Ok(status)
    }

    async fn checkpoint(&self) -> Result<Option<u64>, FollowError> {
        let row: Option<(i64,)> = with_pool!(self.database(), pool => {
            sqlx::query_as("SELECT position FROM idp_follower_checkpoint WHERE name = $1")
                .bind(CHECKPOINT)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.and_then(|(p,)| u64::try_from(p).ok()))
    }

    async fn save_checkpoint(&self, next: u64) -> Result<(), FollowError> {
        let next = i64::try_from(next).unwrap_or(i64::MAX);
        with_pool!(self.database(), pool => {
            sqlx::query(
                "INSERT INTO idp_follower_checkpoint (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
            )
            .bind(CHECKPOINT)
            .bind(next)
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    /// Saves the checkpoint if the deliveries before a later position all finished since
    /// `saved`; answers the checkpoint now saved.
    async fn save_progress(
        &self,
        progress: &std::sync::Mutex<Progress>,
        saved: u64,
    ) -> Result<u64, FollowError> {
        let done = lock(progress).done_before();
        if done > saved {
            self.save_checkpoint(done).await?;
            return Ok(done);
        }
        Ok(saved)
    }
}

/// Resolves when `stop` turns `true` or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

const USER_AGENT: &str = concat!("countersign/", env!("CARGO_PKG_VERSION"));

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An absolute `http`/`https` URL with a host, no user info and no fragment.
fn checked_uri(url: &str) -> Result<hyper::Uri, DeliveryError> {
    let parsed = url::Url::parse(url).map_err(|_| DeliveryError::BadUrl)?;
    let usable = matches!(parsed.scheme(), "http" | "https")
        && parsed.host_str().is_some_and(|h| !h.is_empty())
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.fragment().is_none();
    if !usable {
        return Err(DeliveryError::BadUrl);
    }
    parsed.as_str().parse().map_err(|_| DeliveryError::BadUrl)
}

/// One pooled HTTP/1.1 client, `http` and `https` (rustls on ring, the system's roots).
fn http_client() -> Option<Http> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(tls) =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        // ring supports rustls's safe defaults, so this does not happen; if it did, every
        // delivery would fail as unreachable rather than the process panic.
        tracing::error!("no TLS configuration: back-channel deliveries will fail");
        return None;
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = tls.with_root_certificates(roots).with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Some(
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(IN_FLIGHT)
            .build(connector),
    )
}

#[cfg(test)]
mod tests {
    use super::checked_uri;

    #[test]
    fn only_plain_absolute_urls_are_sent_to() {
        assert!(checked_uri("https://rp.example/logout?x=1").is_ok());
        assert!(checked_uri("http://127.0.0.1:8080/bc").is_ok());
        assert!(checked_uri("https://user:pw@rp.example/logout").is_err());
        assert!(checked_uri("https://rp.example/logout#frag").is_err());
        assert!(checked_uri("ftp://rp.example/logout").is_err());
        assert!(checked_uri("/logout").is_err());
    }
}
