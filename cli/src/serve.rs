//! `countersign serve`: the business API and the read-model projections in one process, on
//! the embedded SQLite default or on PostgreSQL (`--database-url postgres://…`). Any number of
//! instances may share one PostgreSQL database: each projects into the shared read models
//! (checkpointed in the same transaction, so they never double-apply) and serves reads.
//!
//! The admin key comes from `--admin-key-file` / `COUNTERSIGN_ADMIN_KEY_FILE` or the
//! `COUNTERSIGN_ADMIN_KEY` variable; with SQLite and neither set, `<database file>.admin-key`
//! is created on first start (owner-readable only) and its path is logged, never the key.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use countersign_api::{ApiConfig, AppState};
use countersign_commands::{Clock, Commands, SystemClock};
use countersign_device_gateway::{Gateway, GatewayConfig};
use countersign_domain::second_factor::LockoutPolicy;
use countersign_eventstore::vault::KeyVault;
use countersign_projections::ReadModels;
use countersign_sfs::Sfs;
use zeroize::Zeroizing;

use crate::Settings;
use crate::config::{create_secret_file, sqlite_path};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (the chosen address is printed).
    #[arg(long, env = "COUNTERSIGN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File holding the admin key (one line).
    #[arg(long, env = "COUNTERSIGN_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// Where apps reach the device gateway, as they see it (behind a proxy:
    /// `wss://gw.example.com/v1/device`); written into QR codes. Default:
    /// `ws://{listen address}/v1/device`.
    #[arg(long, env = "COUNTERSIGN_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Longest a read waits for `min_position`, milliseconds.
    #[arg(long, env = "COUNTERSIGN_MAX_WAIT_MS", default_value_t = 5_000)]
    pub max_wait_ms: u64,
    /// How often expired sessions and enrolments are swept, milliseconds.
    #[arg(long, env = "COUNTERSIGN_EXPIRY_INTERVAL_MS", default_value_t = 1_000)]
    pub expiry_interval_ms: u64,
    /// Longest time between signed audit checkpoints while events arrive, milliseconds.
    #[arg(
        long,
        env = "COUNTERSIGN_CHECKPOINT_INTERVAL_MS",
        default_value_t = 500
    )]
    pub checkpoint_interval_ms: u64,
    /// Attestation public keys (SEC1 hex) of other apps' second-factor servers whose
    /// attestations this deployment accepts, besides its own SFS's.
    #[arg(
        long = "trust-sfs-key",
        env = "COUNTERSIGN_TRUST_SFS_KEYS",
        value_delimiter = ','
    )]
    pub trust_sfs_keys: Vec<String>,
    /// The SFS's lockout: consecutive failures that lock for a time (`failures:seconds`), and
    /// that revoke (`failures:revoke`).
    #[arg(
        long,
        env = "COUNTERSIGN_SFS_LOCKOUT",
        default_value = "5:60,8:3600,10:revoke"
    )]
    pub sfs_lockout: String,
    /// What this instance runs (comma-separated): `all` (the default: api, gateway, sfs, mc,
    /// projector, and relay when Kafka is configured), or any of `api` (business API and
    /// audit reads, expiry sweeper, push dispatch), `gateway` (device channel), `sfs` (second
    /// factor), `mc` (Message Center: push registration, mailboxes, FCM/APNs delivery),
    /// `relay` (outbox relay into Kafka), `projector` (read models and audit checkpoints).
    #[arg(
        long,
        env = "COUNTERSIGN_ROLE",
        value_delimiter = ',',
        default_value = "all"
    )]
    pub role: Vec<Role>,
    /// Kafka brokers (`host:port,…`): turns on the outbox relay and feeds the projector from
    /// the event topic (scaled mode). Needs PostgreSQL.
    #[arg(long, env = "COUNTERSIGN_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The event topic.
    #[arg(long, env = "COUNTERSIGN_KAFKA_TOPIC", default_value = countersign_scale::kafka::DEFAULT_TOPIC)]
    pub kafka_topic: String,
    /// The projector's consumer group.
    #[arg(
        long,
        env = "COUNTERSIGN_KAFKA_GROUP",
        default_value = "countersign-projector"
    )]
    pub kafka_group: String,
    /// Redis (`redis://host:port`): the projector announces read-model progress there, and
    /// instances that do not project wake waiting reads from it.
    #[arg(long, env = "COUNTERSIGN_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of this deployment's Redis channels.
    #[arg(
        long,
        env = "COUNTERSIGN_REDIS_NAMESPACE",
        default_value = "countersign"
    )]
    pub redis_namespace: String,
    #[command(flatten)]
    pub limits: crate::listener::ConnectionLimits,
    #[command(flatten)]
    pub streams: StreamArgs,
    #[command(flatten)]
    pub push: crate::push::PushArgs,
    #[command(flatten)]
    pub idp: IdpArgs,
}

/// The OpenID Connect provider and the hosted login page (docs/oidc.md).
#[derive(Debug, Clone, clap::Args)]
pub struct IdpArgs {
    /// Where browsers and relying parties reach this deployment (behind a proxy:
    /// `https://login.example.com`); issuers are `{public URL}/oidc/{server id}`, and cookies
    /// are `Secure` when it is `https`. Default: `http://{listen address}`.
    #[arg(long, env = "COUNTERSIGN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Browser logins (each opens a session, on behalf of an anonymous visitor) one virtual
    /// server takes at once before the rate below applies.
    #[arg(long, env = "COUNTERSIGN_LOGIN_BURST", default_value_t = 200)]
    pub login_burst: u32,
    /// Browser logins per second one virtual server takes, sustained.
    #[arg(long, env = "COUNTERSIGN_LOGIN_PER_SECOND", default_value_t = 50)]
    pub login_per_second: u32,
}

impl Default for IdpArgs {
    fn default() -> Self {
        Self {
            public_url: None,
            login_burst: 200,
            login_per_second: 50,
        }
    }
}

impl ServeArgs {
    /// `serve`'s defaults, on a free loopback port, with this admin key file: what the demo,
    /// the benches and the tests start (a test checks these are the command line's defaults).
    #[must_use]
    pub fn local(admin_key_file: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_key_file: Some(admin_key_file),
            gateway_url: None,
            max_wait_ms: 5_000,
            expiry_interval_ms: 1_000,
            checkpoint_interval_ms: 500,
            trust_sfs_keys: Vec::new(),
            sfs_lockout: "5:60,8:3600,10:revoke".into(),
            role: vec![Role::All],
            kafka_brokers: None,
            kafka_topic: countersign_scale::kafka::DEFAULT_TOPIC.into(),
            kafka_group: "countersign-projector".into(),
            redis_url: None,
            redis_namespace: "countersign".into(),
            limits: crate::listener::ConnectionLimits::default(),
            streams: StreamArgs::default(),
            push: crate::push::PushArgs {
                fcm_url: countersign_message_center::fcm::FCM_DEFAULT_BASE_URL.into(),
                apns_url: countersign_message_center::apns::APNS_DEFAULT_BASE_URL.into(),
                ..crate::push::PushArgs::default()
            },
            idp: IdpArgs::default(),
        }
    }
}

/// Limits of long-lived answers: server-sent event streams and guest device channels.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Most event streams (tenant feed, session and transaction events) one API key holds.
    #[arg(long, env = "COUNTERSIGN_MAX_STREAMS_PER_KEY", default_value_t = 500)]
    pub max_streams_per_key: usize,
    /// Most event streams one virtual server's keys hold together.
    #[arg(
        long,
        env = "COUNTERSIGN_MAX_STREAMS_PER_SERVER",
        default_value_t = 1_000
    )]
    pub max_streams_per_server: usize,
    /// Most event streams the instance holds.
    #[arg(long, env = "COUNTERSIGN_MAX_STREAMS", default_value_t = 5_000)]
    pub max_streams: usize,
    /// Longest an event stream lives, seconds; the client resumes with `Last-Event-ID`.
    #[arg(long, env = "COUNTERSIGN_MAX_STREAM_SECS", default_value_t = 3_600)]
    pub max_stream_secs: u64,
    /// Longest a guest device channel (enrolment, a QR scan without an account) may stay
    /// without sending a request, milliseconds.
    #[arg(long, env = "COUNTERSIGN_GUEST_IDLE_MS", default_value_t = 30_000)]
    pub guest_idle_ms: u64,
    /// Longest a guest device channel may stay open, milliseconds.
    #[arg(long, env = "COUNTERSIGN_GUEST_LIFETIME_MS", default_value_t = 600_000)]
    pub guest_lifetime_ms: u64,
    /// Secure channel: messages (`send_data`, `set_device_data`) one account may send at once
    /// before its rate applies.
    #[arg(long, env = "COUNTERSIGN_SECURE_CHANNEL_BURST", default_value_t = 200)]
    pub secure_channel_burst: u32,
    /// Secure channel: messages per second one account may send, sustained.
    #[arg(
        long,
        env = "COUNTERSIGN_SECURE_CHANNEL_PER_SECOND",
        default_value_t = 100
    )]
    pub secure_channel_per_second: u32,
}

impl Default for StreamArgs {
    fn default() -> Self {
        Self {
            max_streams_per_key: 500,
            max_streams_per_server: 1_000,
            max_streams: 5_000,
            max_stream_secs: 3_600,
            guest_idle_ms: 30_000,
            guest_lifetime_ms: 600_000,
            secure_channel_burst: 200,
            secure_channel_per_second: 100,
        }
    }
}

/// A part of countersign that an instance may run on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Api,
    Gateway,
    Sfs,
    Mc,
    Relay,
    Projector,
}

/// The roles an instance runs, `all` expanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Roles {
    api: bool,
    gateway: bool,
    sfs: bool,
    mc: bool,
    relay: bool,
    projector: bool,
}

impl Roles {
    fn of(roles: &[Role], kafka: bool) -> Self {
        let has = |r: Role| roles.contains(&Role::All) || roles.contains(&r);
        Self {
            api: has(Role::Api),
            gateway: has(Role::Gateway),
            sfs: has(Role::Sfs),
            mc: has(Role::Mc),
            relay: roles.contains(&Role::Relay) || (roles.contains(&Role::All) && kafka),
            projector: has(Role::Projector),
        }
    }
}

fn admin_key(settings: &Settings, args: &ServeArgs) -> anyhow::Result<Zeroizing<String>> {
    if let Ok(key) = std::env::var("COUNTERSIGN_ADMIN_KEY") {
        return check_admin_key(Zeroizing::new(key));
    }
    let path = match (&args.admin_key_file, sqlite_path(&settings.database_url)) {
        (Some(path), _) => path.clone(),
        (None, Some(db)) => {
            let mut name = db.into_os_string();
            name.push(".admin-key");
            let path = PathBuf::from(name);
            if !path.exists() {
                create_secret_file(&path)?;
                tracing::warn!(path = %path.display(), "created an admin key file");
            }
            path
        }
        (None, None) => bail!(
            "no admin key: set --admin-key-file, COUNTERSIGN_ADMIN_KEY_FILE or COUNTERSIGN_ADMIN_KEY"
        ),
    };
    let text = Zeroizing::new(
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the admin key file {}", path.display()))?,
    );
    crate::config::warn_if_readable_by_others(&path, "admin key");
    check_admin_key(Zeroizing::new(text.trim().to_owned()))
}

fn check_admin_key(key: Zeroizing<String>) -> anyhow::Result<Zeroizing<String>> {
    if key.trim().len() < 32 {
        bail!("the admin key must be at least 32 characters (use `countersign keygen`)");
    }
    Ok(key)
}

/// How long a stopping server waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running API: its address and state, until [`Running::stop`] or the process ends.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its shared state (tests reach the read models through it).
    pub state: AppState,
    /// The IdP's state, on an instance with the API role.
    pub idp: Option<countersign_idp::IdpState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the server stops (a signal, or a failure of a background task).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let _keep = self.stop.take();
        (&mut self.task).await.context("the server task failed")?
    }

    /// Stops serving and waits for the tasks to end.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("the server task failed")?
    }
}

/// Starts the API, the projector and the expiry sweeper; answers once it listens.
pub async fn start(
    settings: &Settings,
    args: &ServeArgs,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    let opened = crate::connect(settings).await?;
    let vault = KeyVault::new(opened.vault.clone(), settings.master_key()?);
    let audit_key = crate::audit::signing_key(&vault).await?;
    let admin_key = admin_key(settings, args)?;
    let commands = Commands::new(opened.events.clone(), vault.clone(), clock.clone());
    let reads = ReadModels::new(opened.database.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let gateway_url = args
        .gateway_url
        .clone()
        .unwrap_or_else(|| format!("ws://{addr}/v1/device"));
    let sfs = Sfs::new(
        opened.events.clone(),
        vault.clone(),
        opened.database.clone(),
        clock.clone(),
        LockoutPolicy::parse(&args.sfs_lockout)
            .map_err(|e| anyhow::anyhow!("--sfs-lockout: {e}"))?,
        Arc::new(NsEnrolments {
            reads: reads.clone(),
            store: opened.events.clone(),
            max_wait: Duration::from_millis(args.max_wait_ms),
        }),
    )
    .await
    .context("cannot start the second-factor server")?;
    let roles = Roles::of(&args.role, args.kafka_brokers.is_some());
    // The Message Center, when this instance runs it, and every MC the NS sends through.
    let message_center = if roles.mc {
        Some(
            countersign_message_center::MessageCenter::new(
                opened.events.clone(),
                vault.clone(),
                opened.database.clone(),
                clock.clone(),
                args.push.senders()?,
                countersign_message_center::McLimits::default(),
            )
            .await
            .context("cannot start the Message Center")?,
        )
    } else {
        None
    };
    let mut message_centers = args.push.trusted()?;
    if let Some(mc) = &message_center {
        message_centers.push(countersign_device_gateway::TrustedMc {
            key: mc.public_key(),
            url: args
                .push
                .mc_url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}")),
        });
    }
    let mut trusted_sfs_keys = vec![sfs.attestation_verifying_key()];
    for key in &args.trust_sfs_keys {
        let bytes = hex::decode(key.trim()).context("--trust-sfs-key must be hex")?;
        trusted_sfs_keys.push(
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                .map_err(|_| anyhow::anyhow!("--trust-sfs-key is not a P-256 public key"))?,
        );
    }
    let gateway = Gateway::new(
        commands.clone(),
        reads.clone(),
        opened.events.clone(),
        vault.clone(),
        clock.clone(),
        GatewayConfig {
            max_wait: Duration::from_millis(args.max_wait_ms),
            trusted_sfs_keys,
            guest_idle: Duration::from_millis(args.streams.guest_idle_ms.max(1)),
            guest_lifetime: Duration::from_millis(args.streams.guest_lifetime_ms.max(1)),
            message_centers: message_centers.clone(),
            secure_channel: countersign_device_gateway::SecureChannelLimits {
                per_account: countersign_device_gateway::Rate {
                    burst: args.streams.secure_channel_burst,
                    per_second: args.streams.secure_channel_per_second,
                },
                ..countersign_device_gateway::SecureChannelLimits::default()
            },
            ..GatewayConfig::default()
        },
    );
    let mut config = ApiConfig::new(admin_key.trim(), gateway_url);
    if roles.api {
        config.openapi_extension = Some(Arc::new(countersign_idp::openapi::document()));
    }
    config.max_wait = Duration::from_millis(args.max_wait_ms);
    config.streams = countersign_api::streams::StreamLimits {
        per_key: args.streams.max_streams_per_key,
        per_server: args.streams.max_streams_per_server,
        total: args.streams.max_streams,
        lifetime: Duration::from_secs(args.streams.max_stream_secs.max(1)),
    };
    let state = AppState::new(
        commands,
        reads.clone(),
        opened.events.clone(),
        clock.clone(),
        config,
    )
    .with_audit(
        countersign_projections::audit::AuditTree::new(opened.database.clone()),
        *audit_key.verifying_key(),
    );
    tracing::info!(%addr, database = %settings.database_display(), ?roles, "serving");
    let kafka = args
        .kafka_brokers
        .as_ref()
        .map(|brokers| countersign_scale::KafkaConfig::new(brokers, &args.kafka_topic));
    if roles.relay && kafka.is_none() {
        bail!("the relay role needs Kafka: set --kafka-brokers");
    }
    let bus = args
        .redis_url
        .as_deref()
        .map(|url| countersign_scale::Bus::new(url, &args.redis_namespace))
        .transpose()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut app = axum::Router::new();
    let mut idp_state = None;
    if roles.api {
        app = app.merge(countersign_api::router(state.clone()));
        let mut idp = countersign_idp::IdpConfig::new(
            args.idp
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}")),
        );
        idp.login_burst = args.idp.login_burst;
        idp.login_per_second = args.idp.login_per_second;
        let idp = countersign_idp::IdpState::new(state.clone(), idp);
        app = app.merge(countersign_idp::router(idp.clone()));
        idp_state = Some(idp);
    } else {
        app = app.route(
            "/healthz",
            axum::routing::get(countersign_api::state::healthz),
        );
    }
    if roles.gateway {
        app = app.merge(gateway.router());
        state
            .metrics()
            .register(|registry| gateway.register_metrics(registry));
    }
    if roles.sfs {
        app = app.merge(sfs.router());
    }
    if let Some(mc) = &message_center {
        app = app.merge(mc.router());
        state
            .metrics()
            .register(|registry| mc.register_metrics(registry));
    }
    let mut background = tokio::task::JoinSet::new();
    // Tasks whose end stops the instance: the projector and the relay.
    let mut essential = tokio::task::JoinSet::new();
    if roles.api {
        let every = Duration::from_millis(args.expiry_interval_ms.max(10));
        background.spawn(countersign_api::expiry::run(state.clone(), every));
    }
    if roles.gateway {
        background.spawn(async move { gateway.follow().await });
    }
    if let Some(mc) = message_center {
        let (_keep, stop) = tokio::sync::watch::channel(false);
        background.spawn(async move {
            let _keep = _keep;
            if let Err(error) = mc.run(stop).await {
                tracing::error!(%error, "the Message Center's delivery worker stopped");
            }
        });
    }
    let idp_running = idp_state.clone();
    if let Some(idp) = idp_state {
        // Back-channel logout tokens and CIBA ping notifications to relying parties.
        let backchannel = countersign_idp::backchannel::Backchannel::new(idp);
        state
            .metrics()
            .register(|registry| backchannel.register_metrics(registry));
        let (keep, stop) = tokio::sync::watch::channel(false);
        background.spawn(async move {
            let _keep = keep;
            backchannel.run(stop).await;
        });
    }
    if roles.api && !message_centers.is_empty() {
        let pusher = countersign_device_gateway::Pusher::new(
            Commands::new(opened.events.clone(), vault.clone(), clock.clone()),
            reads.clone(),
            opened.events.clone(),
            vault.clone(),
            opened.database.clone(),
            clock.clone(),
            message_centers,
        );
        background.spawn(async move { pusher.run().await });
    }
    if roles.projector {
        background.spawn(checkpoints(
            opened.events.clone(),
            state.audit().clone(),
            audit_key,
            clock,
            Duration::from_millis(args.checkpoint_interval_ms.max(10)),
        ));
        let projector = reads.clone();
        let feed: Arc<dyn countersign_projections::EventFeed> = match &kafka {
            Some(kafka) => Arc::new(countersign_scale::KafkaFeed::new(
                kafka.clone(),
                &args.kafka_group,
                opened.events.clone(),
            )),
            None => countersign_projections::store_feed(&opened.events),
        };
        essential.spawn(async move {
            match projector.run_from(feed).await {
                Err(error) => anyhow::anyhow!("the read-model projector stopped: {error}"),
                Ok(()) => anyhow::anyhow!("the read-model projector stopped"),
            }
        });
        if let Some(bus) = bus.clone() {
            let processed = reads.processed();
            background.spawn(async move { bus.announce(processed).await });
        }
    } else if roles.api || roles.gateway || roles.sfs {
        // Reads wait for the projector of another instance.
        match bus.clone() {
            Some(bus) => {
                let reads = reads.clone();
                background.spawn(async move { bus.follow(reads).await });
            }
            None => {
                tracing::warn!(
                    "no projector in this instance and no --redis-url: polling the read models' checkpoints"
                );
                let reads = reads.clone();
                background.spawn(async move {
                    loop {
                        if let Err(error) = reads.refresh_processed().await {
                            tracing::warn!(%error, "cannot read the read models' checkpoints");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
        }
    }
    if roles.relay
        && let Some(kafka) = &kafka
    {
        let relay =
            countersign_scale::Relay::new(&opened.database, opened.events.clone(), kafka.clone())?;
        essential.spawn(async move {
            relay.run().await;
            anyhow::anyhow!("the outbox relay stopped")
        });
    }
    let limits = args.limits.clone();
    let task = tokio::spawn(async move {
        let (signalled, drain) = tokio::sync::oneshot::channel::<()>();
        let limits = limits.clone();
        let server = async move {
            crate::listener::serve(listener, app, &limits, async move {
                tokio::select! {
                    _ = stopped => {}
                    () = shutdown() => {}
                }
                let _ = signalled.send(());
            })
            .await;
            anyhow::Ok(())
        };
        // Streams that never end by themselves (the tenant event feed, idle device channels)
        // get a grace period after the signal, then are closed.
        let drained = async move {
            if drain.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                tracing::info!("closing the connections still open after {SHUTDOWN_GRACE:?}");
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            served = server => served.context("the HTTP server failed"),
            () = drained => Ok(()),
            Some(ended) = essential.join_next() => match ended {
                Ok(error) => Err(error),
                Err(error) => Err(anyhow::anyhow!("a background task panicked: {error}")),
            },
        };
        essential.abort_all();
        background.abort_all();
        result
    });
    Ok(Running {
        addr,
        state,
        idp: idp_running,
        stop: Some(stop),
        task,
    })
}

/// Keeps the audit tree up to date and signs a checkpoint at most every `interval` while
/// events arrive (waking on commits). Between checkpoints it catches up every quarter
/// interval, so signing finds little left to add: the lag of a checkpoint behind the events
/// it covers stays near `interval`. Failures are logged and retried.
async fn checkpoints(
    store: countersign_eventstore::SharedStore,
    tree: countersign_projections::audit::AuditTree,
    key: p256::ecdsa::SigningKey,
    clock: Arc<dyn Clock>,
    interval: Duration,
) {
    let pace = interval / 4;
    let mut head = store.head();
    let mut last_signed: Option<std::time::Instant> = None;
    // The last checkpoint due found nothing new to sign.
    let mut idle = false;
    loop {
        head.borrow_and_update();
        let pass = std::time::Instant::now();
        if last_signed.is_none_or(|t| t.elapsed() >= interval) {
            match tree
                .checkpoint(&store, &key, "countersign", clock.now().as_millis())
                .await
            {
                Ok(signed) => {
                    idle = signed.is_none();
                    if !idle {
                        last_signed = Some(std::time::Instant::now());
                    }
                }
                Err(error) => tracing::warn!(%error, "could not sign an audit checkpoint"),
            }
        } else if let Err(error) = tree.catch_up(&store).await {
            tracing::warn!(%error, "could not catch up the audit tree");
        }
        // Wait for the next commit, at least until the next catch-up is paced to start, or
        // until the next checkpoint is due (with nothing new at the last one, re-check every
        // interval for writers this process cannot hear).
        let until_due = || {
            if idle {
                interval
            } else {
                last_signed.map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed()))
            }
        };
        tokio::time::sleep(pace.saturating_sub(pass.elapsed()).min(until_due())).await;
        let until_due = until_due();
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(until_due).await;
                }
            }
            () = tokio::time::sleep(until_due) => {}
        }
    }
}

pub async fn run(settings: &Settings, args: ServeArgs) -> anyhow::Result<()> {
    let running = start(settings, &args, Arc::new(SystemClock)).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "countersign serve: listening on http://{}",
            running.addr
        )?;
        out.flush()?;
    }
    running.wait().await
}

/// The SFS's authority for a first PIN registration: an account of the app instance in the
/// accounts read model, once that model has seen the log's head (the app registers its PIN
/// right after its enrolment was acknowledged).
#[derive(Debug)]
struct NsEnrolments {
    reads: ReadModels,
    store: countersign_eventstore::SharedStore,
    max_wait: Duration,
}

impl countersign_sfs::Enrolments for NsEnrolments {
    fn enrolled(
        &self,
        app: countersign_domain::AppInstanceId,
    ) -> futures::future::BoxFuture<'_, Result<bool, countersign_sfs::EnrolmentError>> {
        let failed = |e: &dyn std::fmt::Display| countersign_sfs::EnrolmentError(e.to_string());
        Box::pin(async move {
            if self
                .reads
                .app_instance_enrolled(app)
                .await
                .map_err(|e| failed(&e))?
            {
                return Ok(true);
            }
            if let Some(head) = self.store.last_position().await.map_err(|e| failed(&e))? {
                let caught_up = self
                    .reads
                    .wait_for(head, self.max_wait)
                    .await
                    .map_err(|e| failed(&e))?;
                if !caught_up {
                    return Err(failed(&"the accounts read model is behind the log"));
                }
            }
            self.reads
                .app_instance_enrolled(app)
                .await
                .map_err(|e| failed(&e))
        })
    }
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn local_is_the_command_lines_defaults() {
        let parsed = Command::try_parse_from([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-key-file",
            "admin.key",
        ])
        .unwrap();
        assert_eq!(
            format!("{:?}", parsed.serve),
            format!("{:?}", ServeArgs::local("admin.key".into()))
        );
    }
}
