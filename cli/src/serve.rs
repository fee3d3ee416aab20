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
        default_value_t = 1_000
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
    check_admin_key(Zeroizing::new(text.trim().to_owned()))
}

fn check_admin_key(key: Zeroizing<String>) -> anyhow::Result<Zeroizing<String>> {
    if key.trim().len() < 32 {
        bail!("the admin key must be at least 32 characters (use `countersign keygen`)");
    }
    Ok(key)
}

/// A running API: its address and state, until [`Running::stop`] or the process ends.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its shared state (tests reach the read models through it).
    pub state: AppState,
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
    )
    .await
    .context("cannot start the second-factor server")?;
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
            ..GatewayConfig::default()
        },
    );
    let mut config = ApiConfig::new(admin_key.trim(), gateway_url);
    config.max_wait = Duration::from_millis(args.max_wait_ms);
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
    tracing::info!(%addr, database = %settings.database_display(), "serving");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = countersign_api::router(state.clone())
        .merge(gateway.router())
        .merge(sfs.router());
    let sweep_every = Duration::from_millis(args.expiry_interval_ms.max(10));
    let sweep_state = state.clone();
    let store = opened.events.clone();
    let checkpointer = tokio::spawn(checkpoints(
        opened.events.clone(),
        state.audit().clone(),
        audit_key,
        clock,
        Duration::from_millis(args.checkpoint_interval_ms.max(10)),
    ));
    let task = tokio::spawn(async move {
        let projector = tokio::spawn(async move { reads.run(store).await });
        let sweeper = tokio::spawn(countersign_api::expiry::run(sweep_state, sweep_every));
        let notices = tokio::spawn(async move { gateway.follow().await });
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            tokio::select! {
                _ = stopped => {}
                () = shutdown() => {}
            }
        });
        let result = tokio::select! {
            served = server => served.context("the HTTP server failed"),
            projected = projector => match projected {
                Ok(Err(error)) => Err(anyhow::anyhow!("the read-model projector stopped: {error}")),
                Ok(Ok(())) => Err(anyhow::anyhow!("the read-model projector stopped")),
                Err(error) => Err(anyhow::anyhow!("the read-model projector panicked: {error}")),
            },
        };
        sweeper.abort();
        notices.abort();
        checkpointer.abort();
        result
    });
    Ok(Running {
        addr,
        state,
        stop: Some(stop),
        task,
    })
}

/// Keeps the audit tree up to date and signs a checkpoint at most every `interval` while
/// events arrive (waking on commits). Failures are logged and retried.
async fn checkpoints(
    store: countersign_eventstore::SharedStore,
    tree: countersign_projections::audit::AuditTree,
    key: p256::ecdsa::SigningKey,
    clock: Arc<dyn Clock>,
    interval: Duration,
) {
    let mut head = store.head();
    loop {
        head.borrow_and_update();
        let started = std::time::Instant::now();
        if let Err(error) = tree
            .checkpoint(&store, &key, "countersign", clock.now().as_millis())
            .await
        {
            tracing::warn!(%error, "could not sign an audit checkpoint");
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
        // Then wait for the next commit (or re-check after an interval, for writers this
        // process cannot hear).
        tokio::select! {
            _ = head.changed() => {}
            () = tokio::time::sleep(interval) => {}
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
