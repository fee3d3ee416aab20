//! The composition root: reads the configuration, opens the store and runs one subcommand.
//! Nothing here decides business rules; that is `domain` (through `commands`).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use countersign_eventstore::{Opened, open};

pub mod audit;
pub mod bench;
pub mod bench_api;
pub mod bench_push;
pub mod bench_streams;
pub mod config;
pub mod demo;
pub mod device;
pub mod ds_echo;
pub mod events;
pub mod listener;
pub mod push;
pub mod replay;
pub mod serve;
pub mod verify;

pub use config::{GlobalArgs, Settings};

/// countersign: strong authentication and transaction signing that can be proven.
#[derive(Debug, Parser)]
#[command(name = "countersign", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the business API and run the read-model projections.
    Serve(Box<serve::ServeArgs>),
    /// Rebuild read models from position 0.
    Replay(replay::ReplayArgs),
    /// Create or update the database schema, then exit.
    Migrate,
    /// Print the event log (`$all` or one stream) as JSON lines.
    Events(events::EventsArgs),
    /// Run a demonstration on the embedded default and print what happened.
    Demo(demo::DemoArgs),
    /// Measure the platform: `bench append` for the event store.
    Bench(bench::BenchArgs),
    /// The Merkle audit trail: build, checkpoint, key, verify.
    Audit(audit::AuditArgs),
    /// Print a new random master key (64 hex digits) for `--master-key-file`.
    Keygen,
    /// Check a transaction's evidence bundle offline: exit 0 and a summary when it proves the
    /// signature, exit 1 and the first failing check when not.
    Verify(verify::VerifyArgs),
    /// A local stand-in for FCM or APNs (their documented HTTP APIs, error answers included),
    /// for tests and development: writes its credentials, prints how to point `serve` at it.
    PushStandin(push::StandinArgs),
    /// A virtual phone on the mobile SDK: enrol, log in (PIN or biometric when the server asks),
    /// accounts, history, delete-account, change-pin, register-biometric, upgrade.
    Device(device::DeviceArgs),
    /// A tiny Data Service: verifies each request's signature against the server's published
    /// key, refuses replays, echoes the body (`docs/data-service.md`).
    DsEcho(ds_echo::DsEchoArgs),
}

impl Cli {
    pub fn log_filter(&self) -> String {
        self.global.log.clone().unwrap_or_else(|| "warn".to_owned())
    }
}

/// Logs go to stderr so stdout stays machine-readable (JSON lines, tables).
pub fn init_tracing(filter: String) {
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the chosen subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::resolve(&cli.global)?;
    match cli.command {
        Command::Migrate => {
            connect(&settings).await?;
            let mut out = std::io::stdout().lock();
            use std::io::Write as _;
            writeln!(
                out,
                "schema is up to date on {}",
                settings.database_display()
            )?;
            Ok(())
        }
        Command::Serve(args) => serve::run(&settings, *args).await,
        Command::Replay(args) => replay::run(&settings, args).await,
        Command::Events(args) => events::run(&settings, args).await,
        Command::Demo(args) => demo::run(&settings, args).await,
        Command::Bench(args) => bench::run(&settings, args).await,
        Command::Audit(args) => audit::run(&settings, args).await,
        Command::Device(args) => device::run(args).await,
        Command::PushStandin(args) => push::run(args).await,
        Command::DsEcho(args) => ds_echo::run(args).await,
        Command::Verify(args) => verify::run(&args),
        Command::Keygen => {
            use std::io::Write as _;
            let key = config::new_master_key_hex()?;
            writeln!(std::io::stdout().lock(), "{}", key.as_str())?;
            Ok(())
        }
    }
}

/// Opens the configured database (applying the schema), with a one-line error.
pub async fn connect(settings: &Settings) -> anyhow::Result<Opened> {
    open(&settings.store_options()).await.with_context(|| {
        format!(
            "cannot open the event store at {}",
            settings.database_display()
        )
    })
}
