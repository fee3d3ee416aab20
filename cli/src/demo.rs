//! `countersign demo`: the whole story in one process, on the embedded default. It starts
//! `countersign serve` on a loopback port (business API, device gateway and second-factor
//! server), creates a virtual server (its key pair, logins that need the app PIN, an API key)
//! and, as the business system over HTTP, users with attributes (deleting one, which shreds
//! their personal data). A virtual phone (the mobile SDK bound to that second-factor server,
//! its state in a temporary folder) enrols from the enrolment QR image, registering its PIN
//! (OPAQUE: the second-factor server never learns it), and logs in to a continuous session
//! from the session's QR image: a mistyped PIN first (refused, attempts counted down), then
//! the right one. The business system sees `logged_in` with the user's attributes, then logs
//! the session out and the phone hears it. Last, every event the story wrote, what a reader of
//! the log learns from each, and the signed audit trail over them.
//!
//! The demo types the PIN for the user and says so; the PIN itself is never printed, nor are
//! the push token, the MC token or a session nonce.
//!
//! Without `--database-url` it uses a fresh SQLite file in a temporary folder, so it can be
//! run any number of times on a machine with nothing but the binary.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use countersign_commands::{Clock, SystemClock};
use countersign_domain::account::AccountEvent;
use countersign_domain::second_factor::{SecondFactorEvent as FactorEvent, SecondFactorKind};
use countersign_domain::server::{ConfigureServer, SecondFactorPolicy, ServerEvent};
use countersign_domain::session::{LogoutReason, SessionEvent};
use countersign_domain::transaction::TransactionEvent;
use countersign_domain::user::UserEvent;
use countersign_domain::{AnyEvent, DomainEvent as _};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, RecordedEvent};
use countersign_message_center::events::McEvent;
use countersign_message_center::standin::FcmStandin;
use countersign_mobile_sdk::{
    ChannelCallbacks, EncryptedFileStorage, HistoryStatus, Interaction, McConfig, NoCallbacks,
    Platform, PushAction, Sdk, SdkConfig, SdkError, SecondFactor, SecondFactorEvent, SessionHandle,
    SfsConfig, State,
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::Settings;
use crate::device::States;
use crate::serve::ServeArgs;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Also print every event as a JSON line.
    #[arg(long)]
    pub json: bool,
}

/// How long the demo waits for one step of the phone or the server before it gives up.
const STEP: Duration = Duration::from_secs(30);

/// The PIN the demo's user chooses, and the one they mistype first. Never printed.
const PIN: &str = "4096";
const MISTYPED_PIN: &str = "4069";

/// The phone's FCM registration token at the stand-in, and the app's package. Never printed.
const PUSH_TOKEN: &str = "demo-phone-token";
const APP_ID: &str = "example.bank.app";

/// The phone's second factor is asked.
const WAITS_FOR_FACTOR: State = State::UserInteraction(Interaction::WaitForSecondFactor);

pub async fn run(settings: &Settings, args: DemoArgs) -> anyhow::Result<()> {
    // Holds the admin key, the phone's state and (by default) the database; removed at the end.
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let mut settings = settings.clone();
    if settings.database_url_is_default {
        settings.database_url = format!("sqlite://{}", tmp.path().join("demo.db").display());
    }
    let opened = crate::connect(&settings).await?;
    let store = opened.events.clone();
    let start = store.last_position().await?.map_or(0, |p| p + 1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "countersign demo on {}", settings.database_display())?;

    let admin_key_file = tmp.path().join("admin.key");
    crate::config::create_secret_file(&admin_key_file)?;
    let mut serve = ServeArgs::local(admin_key_file);
    serve.checkpoint_interval_ms = 1_000;
    // Google's push service, stood in for in this process; the Message Center gets the
    // stand-in's service-account file as it would a real Firebase project's.
    let fcm = FcmStandin::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("cannot start the FCM stand-in")?;
    let fcm_account = tmp.path().join("fcm-service-account.json");
    std::fs::write(&fcm_account, fcm.service_account_json())
        .with_context(|| format!("cannot write {}", fcm_account.display()))?;
    serve.push.fcm_service_account = Some(fcm_account);
    serve.push.fcm_url = fcm.url();
    let running = crate::serve::start(&settings, &serve, Arc::new(SystemClock)).await?;
    let base = format!("http://{}", running.addr);
    writeln!(
        out,
        " 1. started countersign serve in this process on {base}: the business API, the device \
         gateway at ws://{addr}/v1/device, the second-factor server at ws://{addr}/v1/sfs and \
         the Message Center at ws://{addr}/v1/mc, which pushes to Android phones through an FCM \
         stand-in on {fcm_url} (Google's HTTP v1 API, in this process)",
        addr = running.addr,
        fcm_url = fcm.url()
    )?;

    // The operator's part, through the command services (what the admin API calls).
    let commands = running.state.commands().clone();
    let meta = Metadata {
        actor: Some("demo".into()),
        ..Metadata::default()
    };
    let (server, _) = commands.servers.create("Demo Bank", &meta, None).await?;
    writeln!(
        out,
        " 2. created virtual server Demo Bank ({server}) with a fresh P-256 key pair (private \
         key sealed in the key vault)"
    )?;
    // The bank's Data Service for the secure channel (step 16): `countersign ds-echo`, in this
    // process, pinned to the server's public key.
    let data_service = DataService::start(&base, server).await?;
    commands
        .servers
        .configure(
            server,
            ConfigureServer {
                logo_url: Some(Some("https://bank.example/logo.png".into())),
                data_service: Some(Some(countersign_domain::server::DataServiceSettings {
                    url: data_service.url.clone(),
                    timeout_ms: 5000,
                })),
                // Every login needs the app PIN (the API's `"second_factor": "pin"`).
                second_factor: Some(SecondFactorPolicy {
                    pin_allowed: true,
                    biometric_allowed: false,
                    require_for_login: true,
                    login_reuse_window_secs: 0,
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
        " 3. configured it: logo, every login needs the app PIN, 600 s session timeout, 30 s ping, \
         its Data Service at {} (countersign ds-echo, in this process)",
        data_service.url
    )?;
    let (key_id, token, issued) = commands
        .servers
        .issue_api_key(server, "payments backend", &meta, None)
        .await?;
    // The API checks keys against its read models: wait until they hold this one.
    running
        .state
        .wait_for(issued.position)
        .await
        .map_err(|e| anyhow::anyhow!("the read models did not catch up: {e}"))?;
    writeln!(
        out,
        " 4. issued API key {key_id} to the business system (the token goes to the caller once; \
         the log keeps only its SHA-256)"
    )?;

    // The business system's part: HTTP with its API key.
    let business = Business {
        http: reqwest::Client::new(),
        base: format!("{base}/v1/servers/{server}"),
        token: token.expose().to_owned(),
    };
    let alice = "alice@bank.example";
    business
        .json(
            Method::PUT,
            &format!("/users/{alice}"),
            Some(json!({"attributes": {"name": "Alice Martin", "groups": "payments,approvers"}})),
        )
        .await?;
    writeln!(
        out,
        " 5. business system: registered {alice} with attributes name and groups, sealed with a \
         data key per user"
    )?;
    let bob = "bob@bank.example";
    business
        .json(
            Method::PUT,
            &format!("/users/{bob}"),
            Some(json!({"attributes": {"name": "Bob Stone", "phone": "+32 470 00 00 00"}})),
        )
        .await?;
    business
        .json(Method::DELETE, &format!("/users/{bob}"), None)
        .await?;
    writeln!(
        out,
        " 6. business system: registered {bob}, then deleted him: his data key is destroyed, his \
         personal data in the log is unreadable for good"
    )?;

    // The phone: the mobile SDK, its encrypted state in a temporary folder, bound to the
    // second-factor server and the Message Center served alongside (their keys read once:
    // trust on first use; an app ships with them).
    let sfs = SfsConfig::fetch(&format!("{base}/v1/sfs"))
        .await
        .context("cannot read the second-factor server's keys")?;
    let mc = McConfig::fetch(&format!("{base}/v1/mc"))
        .await
        .context("cannot read the Message Center's key")?;
    let phone = Sdk::open(
        Arc::new(EncryptedFileStorage::in_dir(tmp.path().join("phone"))?),
        SdkConfig {
            sfs: Some(sfs),
            mc: Some(mc),
            ..SdkConfig::default()
        },
    )?;
    let image = business
        .bytes(
            Method::POST,
            "/enrolments?format=png",
            Some(json!({"userid": alice})),
        )
        .await?;
    writeln!(
        out,
        " 7. business system: started an enrolment for {alice} and shows its QR code ({} byte \
         PNG)",
        image.len()
    )?;
    let (callbacks, events) = ChannelCallbacks::new();
    let mut states = States::new(events, "    phone: ");
    let enrolment = phone
        .start_session(&crate::device::read_qr_png(&image)?, callbacks)
        .await?;
    states.print(&mut out)?;
    enrolment.confirm_enrol().await?;
    states.print(&mut out)?;
    if enrolment.state() == WAITS_FOR_FACTOR {
        // The first enrolment at a server that asks a PIN: the user chooses one, and the
        // phone registers it at the second-factor server, then proves it for the new account.
        writeln!(
            out,
            "    phone: first enrolment at a server that asks a PIN: the user chooses one\n    \
             phone: PIN entered (registered at the second-factor server with OPAQUE: it never \
             learns the PIN)"
        )?;
        enrolment
            .set_pin_biometric(SecondFactor::pin(PIN))
            .await
            .context("the phone could not register its PIN")?;
    }
    let enrolled = finished(&enrolment).await?;
    states.print(&mut out)?;
    let account = enrolled
        .account_id
        .context("the enrolment answered no account")?;
    writeln!(
        out,
        "    phone: scanned it, confirmed, and holds account {account} for {alice} at Demo Bank"
    )?;

    let nonce = random_nonce()?;
    // The nonce is the session's bearer secret: it travels in `X-Nonce`, never in a path.
    let session = business.session(&nonce);
    let session_opened = session
        .json(
            Method::PUT,
            "/session",
            Some(json!({
                "ping_time_secs": 30,
                "announce_info": "Log in to Demo Bank",
                "session_info": "Welcome back",
            })),
        )
        .await?;
    // Reads wait for the write they follow (read-your-writes): the opening's log position.
    let opened_at = session_opened
        .get("position")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let mut heard = session
        .follow(&format!("/session/events?min_position={opened_at}"))
        .await?;
    let image = session
        .bytes(
            Method::GET,
            &format!("/session/qr?format=png&min_position={opened_at}"),
            None,
        )
        .await?;
    writeln!(
        out,
        " 8. business system: opened a continuous login session (30 s ping) and shows its QR code"
    )?;
    let (callbacks, events) = ChannelCallbacks::new();
    let mut states = States::new(events, "    phone: ");
    let login = phone
        .start_session(&crate::device::read_qr_png(&image)?, callbacks)
        .await?;
    states.print(&mut out)?;
    writeln!(
        out,
        "    phone: shows {:?}; the user picks account {account}",
        login.announce_info().unwrap_or_default()
    )?;
    login.set_account(Some(&account)).await?;
    states.print(&mut out)?;
    if login.state() == WAITS_FOR_FACTOR {
        writeln!(out, "    phone: asks for the PIN; the user mistypes it")?;
        writeln!(out, "    phone: PIN entered")?;
        match login
            .set_pin_biometric(SecondFactor::pin(MISTYPED_PIN))
            .await
        {
            Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin { attempts_left })) => {
                writeln!(out, "    phone: wrong PIN: {attempts_left} attempts left")?;
            }
            other => bail!("the mistyped PIN was not refused: {other:?}"),
        }
        states.print(&mut out)?;
        writeln!(out, "    phone: PIN entered")?;
        login
            .set_pin_biometric(SecondFactor::pin(PIN))
            .await
            .context("the phone's PIN was refused")?;
        states.print(&mut out)?;
    }
    if login.state() != State::Active {
        bail!("the phone did not log in: {:?}", login.snapshot().error);
    }
    let view = session.logged_in(&mut heard, &mut out).await?;
    writeln!(
        out,
        " 9. business system: the session is {} for {}, with attributes:",
        text(&view, "state"),
        text(&view, "userid")
    )?;
    if let Some(attributes) = view.get("attributes").and_then(Value::as_object) {
        for (name, value) in attributes {
            writeln!(out, "      {name} = {value}")?;
        }
    }

    session.json(Method::DELETE, "/session", None).await?;
    writeln!(out, "10. business system: logged the session out")?;
    let ended = finished(&login).await?;
    states.print(&mut out)?;
    if ended.history_status == Some(HistoryStatus::LoggedOut) {
        writeln!(out, "    phone: logged out by the server")?;
    }
    let (state, _) = heard.next_state().await?;
    writeln!(out, "    business system hears: {state}")?;

    push_login(&mut out, &business, &phone, &fcm, &account, alice).await?;

    payment(&mut out, &base, &business, &phone, &account, alice).await?;

    secure_channel(&mut out, &base, &data_service, server, &phone).await?;

    commands
        .servers
        .revoke_api_key(server, key_id, &meta)
        .await?;
    writeln!(out, "17. revoked the business system's API key")?;
    drop((login, enrolment, phone));
    running.stop().await?;

    let users = &commands.users;
    let events = store.read_all(start, 10_000).await?;
    writeln!(out, "\nthe event log ({} events):", events.len())?;
    writeln!(
        out,
        "{:>8}  {:<38}  {:<24}  what a reader learns",
        "position", "type", "stream"
    )?;
    for event in &events {
        let learned = describe(users, event).await;
        let stream: String = event.stream.chars().take(24).collect();
        writeln!(
            out,
            "{:>8}  {:<38}  {:<24}  {learned}",
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

/// The example Data Service the demo's server posts app data to.
struct DataService {
    url: String,
    public_key: Vec<u8>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl DataService {
    /// Starts `ds-echo` on a loopback port, pinned to the key the server publishes.
    async fn start(root: &str, server: countersign_domain::ServerId) -> anyhow::Result<Self> {
        let published: Value = reqwest::get(format!("{root}/v1/device/servers/{server}"))
            .await?
            .error_for_status()?
            .json()
            .await?;
        let public_key = hex::decode(text(&published, "public_key")).context("the server key")?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}/bank/app-data", listener.local_addr()?);
        let task = tokio::spawn(crate::ds_echo::serve(
            listener,
            crate::ds_echo::EchoConfig {
                key: crate::ds_echo::parse_public_key(&hex::encode(&public_key))?,
                url: Some(url.clone()),
                window_secs: 300,
            },
        ));
        Ok(Self {
            url,
            public_key,
            task,
        })
    }
}

impl Drop for DataService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Step 16: the secure channel. The app sends bytes with no user interaction; the NS signs
/// the request (RFC 9421, ES256 with the server's key) and posts it with the account id and
/// the user to the server's Data Service, which verifies and echoes; the app gets the answer.
async fn secure_channel(
    out: &mut impl std::io::Write,
    root: &str,
    data_service: &DataService,
    server: countersign_domain::ServerId,
    phone: &Sdk,
) -> anyhow::Result<()> {
    use sha2::Digest as _;
    let data = br#"{"note":"card limit request","limit":"2500.00"}"#;
    let target = countersign_mobile_sdk::DataServer {
        gateway: format!(
            "{}/v1/device",
            root.replacen("http://", "ws://", 1)
                .replacen("https://", "wss://", 1)
        ),
        server_id: server.to_string(),
        key_fingerprint: hex::encode(sha2::Sha256::digest(&data_service.public_key)),
    };
    let (account, answer) = phone.send_data(&target, data).await?;
    if answer.status != 200 || answer.body != data {
        bail!(
            "the Data Service answered {} with other bytes",
            answer.status
        );
    }
    writeln!(
        out,
        "16. secure channel: the app sent {} bytes with no user interaction; the NS posted them to \
         Demo Bank's Data Service for account {account} with the user, signed with the \
         server's key (RFC 9421); the Data Service (countersign ds-echo) verified the \
         signature and echoed them: the app got 200 and the same bytes",
        data.len()
    )?;
    Ok(())
}

/// Steps 11–12: the phone registers for push; the business system asks the user's phone to
/// log in (a provoke on the user, no QR code); the push goes NS → Message Center → FCM
/// stand-in → phone, which opens it and logs in with the PIN.
async fn push_login(
    out: &mut impl std::io::Write,
    business: &Business,
    phone: &Sdk,
    fcm: &FcmStandin,
    account: &str,
    userid: &str,
) -> anyhow::Result<()> {
    let registered = phone
        .register_push(Platform::Fcm, PUSH_TOKEN, APP_ID)
        .await
        .context("the phone could not register for push")?;
    if !registered.registered.iter().any(|a| a == account) {
        bail!(
            "the phone's account was not registered for push: {:?}",
            registered.failed
        );
    }
    writeln!(
        out,
        "11. phone: registered for push at the Message Center with its FCM token (mailbox {}); \
         it gave Demo Bank, over the device gateway, the mailbox's MC token (the NS seals it in \
         its key vault) and a new push public key for account {account}",
        registered.mailbox
    )?;

    let nonce = random_nonce()?;
    let announce = "Log in to Demo Bank on your computer?";
    let path = format!("/users/{userid}/provoke");
    let response = business
        .send(
            Method::POST,
            &path,
            Some(json!({
                "nonce": nonce,
                "ping_time_secs": 0,
                "announce_info": announce,
                "session_info": "Signed in by push",
            })),
        )
        .await?;
    let status = response.status();
    let provoked: Value = serde_json::from_slice(&response.bytes().await?).unwrap_or(Value::Null);
    let position = provoked
        .get("position")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let asked = provoked
        .get("accounts")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let session = business.session(&nonce);
    let mut heard = session
        .follow(&format!("/session/events?min_position={position}"))
        .await?;
    writeln!(
        out,
        "12. business system: {userid} signs in on the website, no QR code to scan: POST \
         …{path} with a fresh session nonce → {} {}, {asked} account(s) asked",
        status.as_u16(),
        text(&provoked, "state")
    )?;

    let push = tokio::time::timeout(STEP, fcm.next_push(PUSH_TOKEN))
        .await
        .context("no push reached the FCM stand-in in time")?;
    let payload = serde_json::to_vec(&push.payload_json)?;
    writeln!(
        out,
        "    the NS sealed a login request to the account's push key (HPKE, RFC 9180) and \
         handed it to the Message Center, which pushed it through FCM: {} bytes of FCM data",
        payload.len()
    )?;
    let recorded = fcm.recording().bytes();
    let leaks = [userid, account, announce, "Alice Martin"]
        .iter()
        .any(|clear| contains(&recorded, clear.as_bytes()));
    if leaks {
        bail!("the FCM stand-in received something in clear");
    }
    writeln!(
        out,
        "    FCM stand-in: {} request(s) received; none holds the userid, the account id, the \
         user's name or the announce text: ciphertext only",
        fcm.recording().len()
    )?;

    let (callbacks, events) = ChannelCallbacks::new();
    let mut states = States::new(events, "    phone: ");
    let action = phone
        .process_push(&payload, callbacks)
        .await
        .context("the phone refused the push")?;
    let PushAction::Login(login) = action else {
        bail!("the push was no login request: {action:?}");
    };
    states.print(out)?;
    writeln!(
        out,
        "    phone: the push opens with account {account}'s push key (and only for this server \
         and account): a login request showing {:?}; the user confirms",
        login.announce_info().unwrap_or_default()
    )?;
    login.set_account(Some(account)).await?;
    states.print(out)?;
    if login.state() == WAITS_FOR_FACTOR {
        writeln!(out, "    phone: asks for the PIN\n    phone: PIN entered")?;
        login
            .set_pin_biometric(SecondFactor::pin(PIN))
            .await
            .context("the phone's PIN was refused")?;
    }
    let ended = finished(&login).await?;
    states.print(out)?;
    if ended.history_status != Some(HistoryStatus::LoggedInOneShot) {
        bail!("the pushed login did not complete: {ended:?}");
    }
    let view = session.logged_in(&mut heard, out).await?;
    writeln!(
        out,
        "    business system: the session is {} for {} (can_provoke: {})",
        text(&view, "state"),
        text(&view, "userid"),
        view.get("can_provoke")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    )?;
    // What an app does when it shows its main screen: pull the mailbox. The message pushed
    // is there too (a push may be lost); it ran already, so it is ignored.
    let pulled = phone
        .pull_messages(Arc::new(NoCallbacks))
        .await
        .context("the phone could not pull its mailbox")?;
    writeln!(
        out,
        "    phone: pulled its mailbox (as on showing its main screen): {} message(s), {} of \
         them run already and ignored",
        pulled.processed + pulled.duplicates + pulled.expired + pulled.failed.len(),
        pulled.duplicates
    )?;
    Ok(())
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Steps 13–15: the business system asks for a payment, the phone shows it and approves it
/// with a fresh PIN, the business system fetches the evidence and verifies it offline.
async fn payment(
    out: &mut impl std::io::Write,
    root: &str,
    business: &Business,
    phone: &Sdk,
    account: &str,
    userid: &str,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let data =
        br#"{"amount":"120.00","currency":"EUR","creditor":"ACME BV","iban":"NL91ABNA0417164300"}"#;
    let created = business
        .json(
            Method::POST,
            "/transactions",
            Some(json!({
                "userid": userid,
                "data": base64::engine::general_purpose::STANDARD.encode(data),
                "content_type": "application/json",
                "text": "Pay €120.00 to ACME BV\nIBAN NL91 ABNA 0417 1643 00",
                "announce_info": "A payment to approve",
            })),
        )
        .await?;
    let id = text(&created, "transaction_id").to_owned();
    let created_at = created.get("position").and_then(Value::as_u64).unwrap_or(0);
    let mut heard = business
        .follow(&format!(
            "/transactions/{id}/events?min_position={created_at}"
        ))
        .await?;
    writeln!(
        out,
        "13. business system: asked {userid} to approve a payment (transaction {id}, {} bytes of \
         application/json)",
        data.len()
    )?;
    let pending = phone.pending_transactions(account).await?;
    if !pending.iter().any(|p| p.transaction_id == id) {
        bail!("the phone does not see the payment among its pending transactions");
    }
    let shown = phone.get_transaction(account, &id).await?;
    writeln!(out, "    phone: a payment waits; it shows:")?;
    for line in shown.text.lines() {
        writeln!(out, "      | {line}")?;
    }
    writeln!(
        out,
        "    phone: the user approves; PIN entered (a fresh one, never reused)"
    )?;
    phone
        .sign_transaction(
            account,
            &shown,
            SecondFactor::pin(PIN),
            std::collections::BTreeMap::from([("model".to_owned(), "demo phone".to_owned())]),
            None,
        )
        .await
        .context("the phone could not sign the payment")?;
    writeln!(
        out,
        "    phone: signed it with the account key (ES256) over the data, the text shown and \
         the SFS attestation"
    )?;
    loop {
        let (status, _) = heard.next_state().await?;
        writeln!(out, "    business system hears: {status}")?;
        if status == "signed" {
            break;
        }
        if matches!(status.as_str(), "rejected" | "expired") {
            bail!("the payment was {status}");
        }
    }

    // The evidence exists once a signed checkpoint covers the signature (about a second).
    let path = format!("/transactions/{id}/evidence");
    let started = std::time::Instant::now();
    let bundle = loop {
        let response = business
            .http
            .get(format!("{}{path}", business.base))
            .bearer_auth(&business.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        match response.status() {
            reqwest::StatusCode::OK => break response.bytes().await?.to_vec(),
            reqwest::StatusCode::SERVICE_UNAVAILABLE if started.elapsed() < STEP => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            status => bail!("GET {path}: {status} {}", response.text().await?),
        }
    };
    writeln!(
        out,
        "14. business system: fetched the evidence bundle ({} bytes of CBOR) once the audit \
         trail's signed checkpoint covered the signature",
        bundle.len()
    )?;
    // What a verifier does years later, offline: two public keys and the file.
    let public = |path: &'static str| async move {
        let response = business
            .http
            .get(format!("{root}{path}"))
            .bearer_auth(&business.token)
            .send()
            .await?;
        anyhow::Ok(response.error_for_status()?.json::<Value>().await?)
    };
    let audit_key = public("/v1/audit/key").await?;
    let sfs_key = public("/v1/sfs/key").await?;
    let key = |v: &Value, field: &str| -> anyhow::Result<p256::ecdsa::VerifyingKey> {
        let bytes = hex::decode(text(v, field))?;
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
            .map_err(|_| anyhow::anyhow!("{field} is not a P-256 key"))
    };
    let verified = countersign_protocol::evidence::verify_evidence(
        &bundle,
        &key(&audit_key, "public_key")?,
        &[key(&sfs_key, "attestation_public_key")?],
        Some(SystemClock.now().0),
    )
    .map_err(|e| anyhow::anyhow!("the evidence does not verify: {e}"))?;
    writeln!(
        out,
        "15. verified it offline (countersign verify): VALID — account {} approved exactly these \
         bytes and this text with a {} attested by the SFS; the signature is event {} of the \
         audit tree of {} leaves signed at checkpoint {}",
        hex::encode(verified.account_id),
        match verified.factor {
            countersign_protocol::attestation::Factor::Pin => "PIN",
            countersign_protocol::attestation::Factor::Biometric => "biometric",
        },
        verified.signed_position,
        verified.checkpoint.tree_size,
        hex::encode(&verified.checkpoint.root_hash[..8])
    )?;
    Ok(())
}

/// Waits (bounded) for a session to end; answers its last snapshot.
async fn finished(
    session: &SessionHandle,
) -> anyhow::Result<countersign_mobile_sdk::SessionSnapshot> {
    let last = tokio::time::timeout(STEP, session.wait_for(|s| s.state.is_final()))
        .await
        .context("the phone's session did not end in time")?;
    if last.state == State::Error {
        bail!("the phone's session failed: {:?}", last.error);
    }
    Ok(last)
}

/// A text field of a JSON object, `?` if missing.
fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("?")
}

/// A session nonce: 16 random bytes, hex (the business system's secret for the session).
fn random_nonce() -> anyhow::Result<String> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(hex::encode(nonce))
}

/// The business system: HTTP calls under one server, with its API key.
struct Business {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Business {
    /// The calls on the login session of `nonce`.
    fn session<'a>(&'a self, nonce: &'a str) -> LoginSession<'a> {
        LoginSession {
            business: self,
            nonce,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<reqwest::Response> {
        self.send_as(method, path, None, body).await
    }

    /// `send`, naming a login session by its nonce in `X-Nonce` when there is one.
    async fn send_as(
        &self,
        method: Method,
        path: &str,
        nonce: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(nonce) = nonce {
            request = request.header("X-Nonce", nonce);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(STEP, request.send())
            .await
            .with_context(|| format!("{method} {path}: no answer in time"))?
            .with_context(|| format!("{method} {path}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let problem = response.text().await.unwrap_or_default();
            bail!("{method} {path}: {status} {problem}");
        }
        Ok(response)
    }

    /// The answer's JSON body (`null` for an empty one).
    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let bytes = self.send(method, path, body).await?.bytes().await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Vec<u8>> {
        Ok(self.send(method, path, body).await?.bytes().await?.to_vec())
    }

    /// Opens a session's server-sent event stream.
    async fn follow(&self, path: &str) -> anyhow::Result<StateStream> {
        Ok(StateStream {
            response: self.send(Method::GET, path, None).await?,
            buffer: String::new(),
        })
    }
}

/// The business system's calls on one login session (`…/session`): the session's nonce goes
/// in `X-Nonce`, since a nonce in the path would end up in proxies' access logs.
struct LoginSession<'a> {
    business: &'a Business,
    nonce: &'a str,
}

impl LoginSession<'_> {
    /// The answer's JSON body (`null` for an empty one).
    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let response = self
            .business
            .send_as(method, path, Some(self.nonce), body)
            .await?;
        Ok(serde_json::from_slice(&response.bytes().await?).unwrap_or(Value::Null))
    }

    async fn bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let response = self
            .business
            .send_as(method, path, Some(self.nonce), body)
            .await?;
        Ok(response.bytes().await?.to_vec())
    }

    /// Waits on `heard` until the session is `logged_in`, telling `out` every state heard,
    /// then reads the session as of that position.
    async fn logged_in(
        &self,
        heard: &mut StateStream,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<Value> {
        let position = loop {
            let (state, position) = heard.next_state().await?;
            writeln!(out, "    business system hears: {state}")?;
            if state == "logged_in" {
                break position;
            }
        };
        self.json(
            Method::GET,
            &format!("/session?min_position={position}"),
            None,
        )
        .await
    }

    /// Opens the session's server-sent event stream.
    async fn follow(&self, path: &str) -> anyhow::Result<StateStream> {
        Ok(StateStream {
            response: self
                .business
                .send_as(Method::GET, path, Some(self.nonce), None)
                .await?,
            buffer: String::new(),
        })
    }
}

/// A session's `event: state` stream, as the business system follows it.
struct StateStream {
    response: reqwest::Response,
    buffer: String,
}

impl StateStream {
    /// The next state and its log position.
    async fn next_state(&mut self) -> anyhow::Result<(String, u64)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                    continue;
                };
                let change: Value = serde_json::from_str(data.trim())?;
                let position = change.get("position").and_then(Value::as_u64);
                // Sessions say `state`, transactions `status`.
                let state = change.get("state").or_else(|| change.get("status"));
                let state = state.and_then(Value::as_str).unwrap_or_default().to_owned();
                return Ok((state, position.unwrap_or(0)));
            }
            let chunk = tokio::time::timeout(STEP, self.response.chunk())
                .await
                .context("the session's event stream said nothing in time")??
                .context("the session's event stream ended")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// What opening the event with today's keys shows: sealed personal data opens only while the
/// user's data key exists.
async fn describe(
    users: &countersign_commands::user::UserCommands,
    event: &RecordedEvent,
) -> String {
    if event.event_type.starts_with("mc.") {
        return match McEvent::decode(event) {
            Ok(mc_event) => describe_mc(&mc_event),
            Err(error) => format!("undecodable: {error}"),
        };
    }
    let decoded = match AnyEvent::decode(&event.event_type, event.schema_version, &event.payload) {
        Ok(decoded) => decoded,
        Err(error) => return format!("undecodable: {error}"),
    };
    let user_event = match &decoded {
        AnyEvent::User(user_event) => user_event,
        AnyEvent::Server(server_event) => return describe_server(server_event),
        AnyEvent::Session(session_event) => return describe_session(session_event),
        AnyEvent::Account(AccountEvent::Registered(e)) => {
            return format!(
                "account {}, its public keys; the user only as a digest",
                e.account.account_id
            );
        }
        AnyEvent::Account(AccountEvent::Upgraded(e)) => {
            return format!(
                "second factor {}, proven by an SFS attestation (its digest only)",
                kind(e.second_factor)
            );
        }
        AnyEvent::Account(AccountEvent::PushRegistered(_)) => {
            return "push: which Message Center (a digest of its key), the account's push public \
                    key; the MC token only as a key-vault reference"
                .to_owned();
        }
        AnyEvent::SecondFactor(factor_event) => return describe_factor(factor_event),
        AnyEvent::Attestation(_) => {
            return "an attestation was spent: a replay of it is refused".to_owned();
        }
        AnyEvent::Transaction(transaction_event) => return describe_transaction(transaction_event),
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

fn describe_transaction(event: &TransactionEvent) -> String {
    match event {
        TransactionEvent::Created(e) => format!(
            "{} bytes of {} and the text to show; the user only as a digest",
            e.data.len(),
            e.content_type
        ),
        TransactionEvent::Presented(e) => format!("shown on account {}'s phone", e.account_id),
        TransactionEvent::Signed(e) => format!(
            "account {}: its COSE_Sign1 over the data and text hashes, the SFS attestation ({})",
            e.account_id,
            kind(e.factor)
        ),
        TransactionEvent::Rejected(e) => format!("declined on account {}", e.account_id),
        TransactionEvent::Expired(_) => "not signed in time".to_owned(),
    }
}

fn describe_session(event: &SessionEvent) -> String {
    match event {
        SessionEvent::Opened(e) if !e.push_to.is_empty() => format!(
            "a push login asking {} account(s); expires {} s after opening",
            e.push_to.len(),
            e.timeout_secs
        ),
        SessionEvent::Opened(e) => format!(
            "ping {} s, expires {} s after opening",
            e.ping_time_secs, e.timeout_secs
        ),
        SessionEvent::Provoked(e) => format!("account {} asked again by push", e.account_id),
        SessionEvent::SecondFactorVerified(e) => format!(
            "{} verified by the SFS (its attestation's digest only)",
            kind(e.factor)
        ),
        SessionEvent::LoggedIn(e) => format!(
            "account {}, the user only as a digest, continuous: {}",
            e.account_id, e.continuous
        ),
        SessionEvent::LoggedOut(e) => match e.reason {
            LogoutReason::User => "by the user".to_owned(),
            LogoutReason::Server => "by the business system".to_owned(),
            LogoutReason::PingMissed => "the device stopped pinging".to_owned(),
        },
        _ => String::new(),
    }
}

/// The Message Center's events: digests, sizes and times; never a token or an envelope.
fn describe_mc(event: &McEvent) -> String {
    match event {
        McEvent::MailboxRegistered { platform, .. } => {
            format!(
                "a mailbox for {} push; the MC token it issued as a digest only",
                platform.to_uppercase()
            )
        }
        McEvent::PushTokenUpdated { .. } => "a new push token, as a digest".to_owned(),
        McEvent::MessageQueued { size, .. } => {
            format!("{size} bytes of ciphertext queued (a digest of them only)")
        }
        McEvent::DeliveryAttempted {
            outcome, reason, ..
        } => format!("push not delivered ({}): {reason}", outcome.label()),
        McEvent::MessageDelivered { latency_ms, .. } => {
            format!("pushed through FCM {latency_ms} ms after it was queued")
        }
        McEvent::PushTokenDropped { reason } => format!("push token dropped: {reason}"),
        McEvent::MessageExpired { .. } => "expired before the phone took it".to_owned(),
        McEvent::MessagePulled { message_ids } => {
            format!("{} message(s) pulled by the phone", message_ids.len())
        }
        McEvent::MessageAcknowledged { message_ids } => {
            format!(
                "{} message(s) acknowledged: gone from the mailbox",
                message_ids.len()
            )
        }
    }
}

/// The second-factor server's events: what it knows of the PIN is a digest of its OPAQUE
/// record, never the PIN.
fn describe_factor(event: &FactorEvent) -> String {
    match event {
        FactorEvent::KeyBound(_) => "the app instance's channel key, as a thumbprint".to_owned(),
        FactorEvent::PinRegistered(_) => {
            "PIN registered: a digest of its OPAQUE record, never the PIN".to_owned()
        }
        FactorEvent::BiometricKeyRegistered(_) => "biometric public key registered".to_owned(),
        FactorEvent::VerificationSucceeded(e) => {
            format!("{} verified; the failure count starts over", kind(e.factor))
        }
        // Counted when the attempt starts, before the SFS can tell (OPAQUE): a right PIN's
        // success follows at once and resets it.
        FactorEvent::VerificationFailed(e) => format!(
            "{} attempt counted as failed until it succeeds: {} in a row",
            kind(e.factor),
            e.failed_attempts
        ),
        FactorEvent::Locked(e) => format!("locked after {} failures", e.failed_attempts),
        FactorEvent::Revoked(e) => format!("revoked ({:?})", e.reason),
    }
}

fn kind(factor: SecondFactorKind) -> &'static str {
    match factor {
        SecondFactorKind::Pin => "PIN",
        SecondFactorKind::Biometric => "biometric",
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
        ServerEvent::SfsKeyTrusted(e) => format!("trusts SFS {}", e.label),
        ServerEvent::SfsKeyDistrusted(_) => "an SFS key distrusted".to_owned(),
        ServerEvent::OidcClientRegistered(e) => format!(
            "OIDC client {} ({:?}), SHA-256 of its secret only",
            e.client_id, e.settings.name
        ),
        ServerEvent::OidcClientUpdated(e) => format!("OIDC client {}", e.client_id),
        ServerEvent::OidcClientSecretRotated(e) => format!("OIDC client {}", e.client_id),
        ServerEvent::OidcClientRemoved(e) => format!("OIDC client {}", e.client_id),
        ServerEvent::OidcKeyRotated(e) => format!("OIDC signing key {}", e.kid),
    }
}
