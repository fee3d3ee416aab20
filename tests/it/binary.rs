//! The `countersign` binary as a user runs it: `demo` on the embedded default in an empty
//! folder, `events` afterwards, and one-line errors for bad configuration.
//!
//! The binary is the one cargo built next to this test binary (`.ci/test` builds the whole
//! workspace first).

use std::path::PathBuf;
use std::process::{Command, Output};

pub(crate) fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/it-… → target/<profile>/countersign
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("countersign");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p countersign`, as .ci/test does)",
        path.display()
    );
    path
}

/// Runs the binary and insists it succeeded, showing its stderr if not.
fn run_ok(dir: &std::path::Path, args: &[&str]) -> Output {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "countersign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env_remove("COUNTERSIGN_DATABASE_URL")
        .env_remove("COUNTERSIGN_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn demo_runs_on_the_embedded_default_with_nothing_installed() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["demo"]);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the default demo leaves nothing behind"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "server.created",
        "server.configured",
        "server.api_key_issued",
        "user.registered",
        "user.attribute_set",
        "user.deleted",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("<erased>"),
        "the deleted user's personal data no longer opens:\n{stdout}"
    );
    // The story with a phone: enrolled with a PIN, a mistyped PIN refused, logged in with the
    // right one, seen by the business system, logged out.
    for expected in [
        "phone: state: waiting for a second factor",
        "phone: state: done (enrolled)",
        "phone: PIN entered",
        "phone: wrong PIN: 4 attempts left",
        "phone: second factor verified",
        "phone: state: active (logged in)",
        "business system hears: logged_in",
        "the session is logged_in for alice@bank.example",
        "name = \"Alice Martin\"",
        "phone: logged out by the server",
        "business system hears: logged_out",
        "session.logged_in",
        "account.registered",
        "account.upgraded",
        "second_factor.pin_registered",
        "second_factor.verification_failed",
        "session.second_factor_verified",
        // The secure channel: the example Data Service verified the NS's signature and echoed.
        "the Data Service (countersign ds-echo) verified the signature and echoed them: the app \
         got 200 and the same bytes",
        "audit verify: OK",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected}:\n{stdout}"
        );
    }
}

#[test]
fn demo_output_and_log_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["demo", "--json", "--database-url", "sqlite://demo.db"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let master = std::fs::read_to_string(dir.path().join("demo.db.key")).unwrap();
    assert_eq!(master.trim().len(), 64);
    assert!(
        !stdout.contains(master.trim()),
        "the master key never reaches the output"
    );
    assert!(
        !stdout.contains("cs_"),
        "no API key token in the output or the events"
    );
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("demo.db") {
            raw.extend(std::fs::read(path).unwrap());
        }
    }
    for personal in ["alice@bank.example", "Alice Martin", "bob@bank.example"] {
        assert!(
            !raw.windows(personal.len())
                .any(|w| w == personal.as_bytes()),
            "{personal} is stored sealed, never in clear"
        );
    }
}

#[test]
fn events_prints_json_lines_of_a_persistent_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = "sqlite://events.db";
    run_ok(dir.path(), &["demo", "--database-url", url]);
    let out = run_ok(dir.path(), &["events", "--database-url", url]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 6, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["position"], i as u64);
        assert!(line["type"].as_str().unwrap().contains('.'));
        assert!(line["payload"].get("undecodable").is_none(), "{line}");
    }
    let first_stream = lines[0]["stream"].as_str().unwrap();
    let out = run(
        dir.path(),
        &["events", "--database-url", url, "--stream", first_stream],
    );
    let stream_lines = String::from_utf8(out.stdout).unwrap().lines().count();
    assert!(stream_lines >= 1 && stream_lines < lines.len());
}

#[test]
fn a_wrong_database_url_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "postgres://nobody@127.0.0.1:1/none",
        "mysql://x",
        "sqlite:///nonexistent-dir/x/y.db",
    ] {
        let out = run(dir.path(), &["migrate", "--database-url", url]);
        assert!(!out.status.success(), "{url} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{url}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_bad_configuration_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), "database_url = 5\n").unwrap();
    let out = run(dir.path(), &["migrate", "--config", "c.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("c.toml"),
        "{stderr}"
    );
}

#[test]
fn the_environment_and_the_config_file_choose_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["migrate"])
        .current_dir(dir.path())
        .env("COUNTERSIGN_DATABASE_URL", "sqlite://from-env.db")
        .env_remove("COUNTERSIGN_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("from-env.db").exists());

    std::fs::write(
        dir.path().join("c.toml"),
        "database_url = \"sqlite://from-file.db\"\n",
    )
    .unwrap();
    run_ok(dir.path(), &["migrate", "--config", "c.toml"]);
    assert!(dir.path().join("from-file.db").exists());
}

#[test]
fn audit_verify_finds_a_changed_event() {
    let dir = tempfile::tempdir().unwrap();
    let url = "sqlite://audited.db";
    let out = run_ok(dir.path(), &["demo", "--database-url", url]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit verify: OK"));

    let key = run(dir.path(), &["audit", "key", "--database-url", url]);
    let key = String::from_utf8(key.stdout).unwrap();
    assert_eq!(
        key.trim().len(),
        130,
        "an uncompressed SEC1 P-256 key: {key}"
    );
    let verify = [
        "audit",
        "verify",
        "--database-url",
        url,
        "--audit-key",
        key.trim(),
    ];
    let out = run(dir.path(), &verify);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: "));

    // Someone with access to the database file changes event 4.
    let db = dir.path().join("audited.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("DROP TRIGGER es_events_no_update")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("UPDATE es_events SET recorded_at = recorded_at + 1 WHERE position = 4")
            .execute(&mut conn)
            .await
            .unwrap();
    });
    let out = run(dir.path(), &verify);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at position 4"), "{stderr}");

    // A key that did not sign the checkpoints is refused too.
    let other = "036b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296";
    let out = run(
        dir.path(),
        &[
            "audit",
            "verify",
            "--database-url",
            url,
            "--audit-key",
            other,
        ],
    );
    assert!(!out.status.success());
}

#[test]
fn audit_follow_signs_what_another_process_appends() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let url = "sqlite://followed.db";
    run_ok(dir.path(), &["migrate", "--database-url", url]);
    let mut follower = KillOnDrop(
        Command::new(binary())
            .args([
                "audit",
                "follow",
                "--database-url",
                url,
                "--interval-ms",
                "200",
            ])
            .current_dir(dir.path())
            .env_remove("COUNTERSIGN_CONFIG")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Another process appends (and does not audit); the follower hears of it by its periodic
    // read and signs what it covers.
    let bench = [
        "bench",
        "append",
        "--database-url",
        url,
        "--batch",
        "5",
        "--writers",
        "2",
        "--seconds",
        "0.3",
    ];
    run_ok(dir.path(), &bench);
    let listed = run_ok(dir.path(), &["events", "--database-url", url]);
    let events = String::from_utf8_lossy(&listed.stdout).lines().count() as u64;
    assert!(events > 0);
    let mut lines = std::io::BufReader::new(follower.0.stdout.take().unwrap()).lines();
    let mut covered = 0;
    while covered < events {
        let line = lines.next().expect("the follower stopped").unwrap();
        let checkpoint: serde_json::Value = serde_json::from_str(&line).unwrap();
        covered = checkpoint["tree_size"].as_u64().unwrap();
        assert!(checkpoint["lag_ms"].as_i64().unwrap() >= 0);
    }
    drop(follower);
    assert_eq!(covered, events);
    let out = run_ok(dir.path(), &["audit", "verify", "--database-url", url]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: "));
}

/// A child process that is killed when the test ends, whether it passes or panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_starts_on_the_embedded_default_and_answers() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("COUNTERSIGN_DATABASE_URL")
        .env_remove("COUNTERSIGN_CONFIG")
        .env_remove("COUNTERSIGN_ADMIN_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = KillOnDrop(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("countersign serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let admin_key = std::fs::read_to_string(dir.path().join("countersign.db.admin-key")).unwrap();
    assert!(admin_key.trim().len() >= 64, "a fresh admin key file");
    assert!(
        !line.contains(admin_key.trim()),
        "the admin key is never printed"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let health = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let created = http
            .post(format!("{base}/v1/servers"))
            .bearer_auth(admin_key.trim())
            .json(&serde_json::json!({"name": "Served"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let doc: serde_json::Value = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(doc["paths"]["/v1/servers/{server_id}/sessions/{nonce}"].is_object());
    });
    drop(server);
}

#[test]
fn replay_of_100k_events_rebuilds_identical_read_models() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("replay.db").display());
    let out = run_ok(
        dir.path(),
        &[
            "bench",
            "replay",
            "--events",
            "100000",
            "--json",
            "--database-url",
            &url,
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["identical"], true, "{report}");
    assert!(report["events"].as_u64().unwrap() >= 100_000);
    let out = run_ok(
        dir.path(),
        &[
            "replay",
            "--quiet",
            "--projection",
            "sessions",
            "--database-url",
            &url,
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("into sessions"));
    let out = run(
        dir.path(),
        &["replay", "--projection", "nonsense", "--database-url", &url],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown projection"));
}

#[test]
fn replay_of_100k_events_rebuilds_identical_read_models_on_postgres() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(countersign_eventstore::testing::TestDb::postgres());
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    std::fs::write(&key, "22".repeat(32)).unwrap();
    let out = run_ok(
        dir.path(),
        &[
            "bench",
            "replay",
            "--events",
            "100000",
            "--json",
            "--database-url",
            db.url(),
            "--master-key-file",
            key.to_str().unwrap(),
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["identical"], true, "{report}");
    runtime.block_on(db.finish());
}
