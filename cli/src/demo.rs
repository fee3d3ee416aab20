//! `countersign demo`: a guided tour on the embedded default. It creates a virtual server
//! (with its key pair and an API key), registers users with attributes, deletes one (which
//! shreds their personal data), and prints every event it wrote.
//!
//! Without `--database-url` it uses a fresh SQLite file in a temporary folder, so it can be
//! run any number of times on a machine with nothing but the binary.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use countersign_commands::{Clock, Commands, SystemClock};
use countersign_domain::server::{ConfigureServer, SecondFactorPolicy, ServerEvent};
use countersign_domain::user::UserEvent;
use countersign_domain::{AnyEvent, DomainEvent as _};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, RecordedEvent};

use crate::Settings;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Also print every event as a JSON line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: &Settings, args: DemoArgs) -> anyhow::Result<()> {
    // Keep the temporary folder alive until the end of the demo.
    let (settings, _tmp) = if settings.database_url_is_default {
        let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
        let mut s = settings.clone();
        s.database_url = format!("sqlite://{}", dir.path().join("demo.db").display());
        (s, Some(dir))
    } else {
        (settings.clone(), None)
    };
    let opened = crate::connect(&settings).await?;
    let vault = KeyVault::new(opened.vault.clone(), settings.master_key()?);
    let store = opened.events.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let commands = Commands::new(store.clone(), vault, clock);
    let (servers, users) = (&commands.servers, &commands.users);
    let start = store.last_position().await?.map_or(0, |p| p + 1);
    let meta = Metadata {
        actor: Some("demo".into()),
        ..Metadata::default()
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "countersign demo on {}", settings.database_display())?;

    let (server, _) = servers.create("Demo Bank", &meta, None).await?;
    writeln!(
        out,
        "1. created virtual server {server} with a fresh P-256 key pair (private key sealed in the key vault)"
    )?;
    servers
        .configure(
            server,
            ConfigureServer {
                logo_url: Some(Some("https://bank.example/logo.png".into())),
                second_factor: Some(SecondFactorPolicy {
                    pin_allowed: true,
                    biometric_allowed: true,
                    require_for_login: true,
                    login_reuse_window_secs: 120,
                }),
                session_timeout_secs: Some(600),
                default_ping_time_secs: Some(30),
                ..ConfigureServer::default()
            },
            &meta,
            None,
        )
        .await?;
    writeln!(
        out,
        "2. configured it: logo, PIN or biometric, 600 s session timeout, 30 s ping"
    )?;
    let (key_id, _token, _) = servers
        .issue_api_key(server, "payments backend", &meta, None)
        .await?;
    writeln!(
        out,
        "3. issued API key {key_id} (the token goes to the caller once; the log keeps only its SHA-256)"
    )?;

    let (alice, _) = users.register(server, "alice@bank.example", &meta).await?;
    users
        .set_attribute(&alice, "name", "Alice Martin", &meta)
        .await?;
    users
        .set_attribute(&alice, "groups", "payments,approvers", &meta)
        .await?;
    let (bob, _) = users.register(server, "bob@bank.example", &meta).await?;
    users
        .set_attribute(&bob, "name", "Bob Stone", &meta)
        .await?;
    users
        .set_attribute(&bob, "phone", "+32 470 00 00 00", &meta)
        .await?;
    users.remove_attribute(&bob, "phone", &meta).await?;
    writeln!(
        out,
        "4. registered alice and bob with attributes, sealed with a data key per user"
    )?;
    users.delete(&bob, &meta).await?;
    writeln!(
        out,
        "5. deleted bob: his data key is destroyed, his personal data in the log is unreadable for good"
    )?;
    let done = servers.revoke_api_key(server, key_id, &meta).await?;
    writeln!(
        out,
        "6. revoked the API key (position {})",
        done.position.unwrap_or(0)
    )?;

    let events = store.read_all(start, 10_000).await?;
    writeln!(out, "\nthe event log ({} events):", events.len())?;
    writeln!(
        out,
        "{:>8}  {:<28}  {:<24}  what a reader learns",
        "position", "type", "stream"
    )?;
    for event in &events {
        let learned = describe(users, event).await;
        let stream: String = event.stream.chars().take(24).collect();
        writeln!(
            out,
            "{:>8}  {:<28}  {:<24}  {learned}",
            event.position, event.event_type, stream
        )?;
    }
    // The audit trail: every event above is a leaf of a Merkle tree whose head is signed.
    let tree = countersign_projections::audit::AuditTree::new(opened.database.clone());
    let audit_key =
        crate::audit::signing_key(&KeyVault::new(opened.vault.clone(), settings.master_key()?))
            .await?;
    let now = SystemClock.now().0;
    if let Some(checkpoint) = tree
        .checkpoint(&store, &audit_key, "countersign-demo", now)
        .await?
    {
        writeln!(
            out,
            "\naudit: signed checkpoint over {} events, root {}",
            checkpoint.tree_size,
            hex::encode(checkpoint.root_hash)
        )?;
    }
    let report = tree
        .verify(
            &store,
            countersign_projections::audit::check_signed(audit_key.verifying_key()),
            |_, _| {},
        )
        .await?;
    match report.finding {
        None => writeln!(
            out,
            "audit verify: OK, {} events agree with {} signed checkpoint(s)",
            report.events, report.checkpoints
        )?,
        Some(finding) => anyhow::bail!("audit verify failed: {}", finding.reason),
    }
    if args.json {
        writeln!(out)?;
        for event in &events {
            writeln!(out, "{}", crate::events::to_json(event))?;
        }
    }
    Ok(())
}

/// What opening the event with today's keys shows: sealed personal data opens only while the
/// user's data key exists.
async fn describe(
    users: &countersign_commands::user::UserCommands,
    event: &RecordedEvent,
) -> String {
    let decoded = match AnyEvent::decode(&event.event_type, event.schema_version, &event.payload) {
        Ok(decoded) => decoded,
        Err(error) => return format!("undecodable: {error}"),
    };
    let user_event = match &decoded {
        AnyEvent::User(user_event) => user_event,
        AnyEvent::Server(server_event) => return describe_server(server_event),
        _ => return String::new(),
    };
    let (field, sealed) = match user_event {
        UserEvent::Registered(e) => ("userid".to_owned(), &e.userid),
        UserEvent::AttributeSet(e) => {
            (countersign_domain::user::attribute_field(&e.name), &e.value)
        }
        UserEvent::AttributeRemoved(e) => return format!("attribute/{} removed", e.name),
        UserEvent::Deleted(_) => return "user deleted, data key destroyed".to_owned(),
    };
    match users.open(&event.stream, &field, sealed).await {
        Ok(Some(text)) => format!("{field} = {text:?}"),
        Ok(None) => format!("{field} = <erased>"),
        Err(_) => format!("{field} = <does not open>"),
    }
}

fn describe_server(event: &ServerEvent) -> String {
    match event {
        ServerEvent::Created(e) => format!(
            "name {:?}, public key thumbprint {}…",
            e.settings.name,
            hex::encode(e.key_thumbprint.get(..8).unwrap_or_default())
        ),
        ServerEvent::Configured(e) => format!(
            "session timeout {} s, ping {} s, second-factor reuse {} s",
            e.settings.session_timeout_secs,
            e.settings.default_ping_time_secs,
            e.settings.second_factor.login_reuse_window_secs
        ),
        ServerEvent::ApiKeyIssued(e) => format!(
            "key {} ({:?}), SHA-256 of the token only",
            e.key_id, e.label
        ),
        ServerEvent::ApiKeyRevoked(e) => format!("key {}", e.key_id),
        ServerEvent::Deleted(_) => "server deleted".to_owned(),
    }
}
