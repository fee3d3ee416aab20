//! `countersign device`, the virtual phone, as a user runs it: `countersign serve` as a child
//! process on a temporary SQLite database, the business system as an HTTP client, and the
//! `device` subcommand reading the QR codes as PNG images the API drew. Enrolment, one-shot
//! logins with `--yes` and through the prompt, a declined login, continuous sessions ended by
//! the server and by SIGTERM, NOACCOUNTS on a fresh device, the history, and deleting the
//! account from the device.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::next_state;
use crate::binary::binary;

/// `countersign serve` in a child process, killed when the test ends.
struct Served {
    child: Child,
    base: String,
    admin_key: String,
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "sqlite://served.db",
            ])
            .current_dir(dir.path())
            .env_remove("COUNTERSIGN_CONFIG")
            .env_remove("COUNTERSIGN_ADMIN_KEY")
            .env_remove("COUNTERSIGN_GATEWAY_URL")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("countersign serve: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let admin_key = std::fs::read_to_string(dir.path().join("served.db.admin-key"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            base,
            admin_key,
            runtime: tokio::runtime::Runtime::new().unwrap(),
            http: reqwest::Client::new(),
            dir,
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        self.runtime.block_on(async {
            let mut request = self
                .http
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(token);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let (status, headers) = (response.status(), response.headers().clone());
            (status, headers, response.bytes().await.unwrap().to_vec())
        })
    }

    /// A JSON call that must succeed; answers the body.
    fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let (status, _, bytes) = self.request(method.clone(), path, token, body);
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    /// Fetches a PNG image and writes it into the test's folder.
    fn png(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        name: &str,
    ) -> PathBuf {
        let (status, headers, bytes) = self.request(method, path, token, body);
        assert!(status.is_success(), "{path}: {status}");
        assert_eq!(headers["content-type"], "image/png");
        let file = self.dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        file
    }

    /// A server whose logins need no second factor, an API key, and user alice with
    /// attributes: (server id, token).
    fn tenant(&self) -> (String, String) {
        let admin = self.admin_key.clone();
        let created = self.call(
            Method::POST,
            "/v1/servers",
            &admin,
            Some(json!({"name": "Bank"})),
        );
        let server = created["server"]["server_id"].as_str().unwrap().to_owned();
        self.call(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            &admin,
            Some(json!({"second_factor": "none"})),
        );
        let key = self.call(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            &admin,
            Some(json!({"label": "backend"})),
        );
        let token = key["token"].as_str().unwrap().to_owned();
        self.call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/alice"),
            &token,
            Some(json!({"attributes": {"name": "Alice Martin"}})),
        );
        (server, token)
    }

    /// Opens a login session and saves its QR code as a PNG file.
    fn session(&self, server: &str, token: &str, nonce: &str, ping_time_secs: u32) -> PathBuf {
        let opened = self.call(
            Method::PUT,
            &format!("/v1/servers/{server}/sessions/{nonce}"),
            token,
            Some(json!({"ping_time_secs": ping_time_secs, "announce_info": "Log in to the bank"})),
        );
        let position = opened["position"].as_u64().unwrap();
        self.png(
            Method::GET,
            &format!("/v1/servers/{server}/sessions/{nonce}/qr?format=png&min_position={position}"),
            token,
            None,
            &format!("{nonce}.png"),
        )
    }

    /// Follows the session's event stream until `state`; answers its log position.
    fn wait_for_state(&self, server: &str, token: &str, nonce: &str, state: &str) -> u64 {
        self.runtime.block_on(async {
            let response = self
                .http
                .get(format!(
                    "{}/v1/servers/{server}/sessions/{nonce}/events",
                    self.base
                ))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let mut stream = response.bytes_stream();
            let mut buffer = String::new();
            loop {
                let change = next_state(&mut stream, &mut buffer).await;
                if change["state"] == state {
                    return change["position"].as_u64().unwrap();
                }
            }
        })
    }
}

fn nonce(byte: u8) -> String {
    hex::encode([byte; 16])
}

fn device_command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .arg("device")
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("COUNTERSIGN_CONFIG")
        .env_remove("COUNTERSIGN_DATABASE_URL")
        .env_remove("COUNTERSIGN_DEVICE_HOME");
    command
}

/// Runs `countersign device --home HOME ARGS` with `stdin` as its input.
fn device(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = device_command(home, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn device_ok(home: &Path, args: &[&str], stdin: &str) -> String {
    let out = device(home, args, stdin);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "device {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts a continuous login with `--yes` and reads its output until it is logged in.
fn continuous_login(
    home: &Path,
    qr: &Path,
) -> (
    Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    String,
) {
    let mut child = device_command(home, &["login", qr.to_str().unwrap(), "--yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("logged in as ") {
            return (child, lines, seen);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the device never logged in:\n{seen}");
}

fn rest(lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) -> String {
    lines.map(|l| l.unwrap() + "\n").collect()
}

#[test]
fn the_virtual_phone_enrols_logs_in_and_deletes_its_account() {
    let served = Served::start();
    let (server, token) = served.tenant();
    let home = served.dir.path().join("phone");
    let home = home.as_path();

    // Enrol from the enrolment QR code, as a PNG image.
    let enrolment = served.png(
        Method::POST,
        &format!("/v1/servers/{server}/enrolments?format=png"),
        &token,
        Some(json!({"userid": "alice"})),
        "enrol.png",
    );
    let out = device_ok(home, &["enrol", enrolment.to_str().unwrap(), "--yes"], "");
    assert!(out.contains("state: waiting for confirmation"), "{out}");
    assert!(out.contains("state: done (enrolled)"), "{out}");
    assert!(out.contains(&format!("server: Bank ({server})")), "{out}");
    let accounts = device_ok(home, &["accounts"], "");
    let row = accounts
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("{accounts}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns.len(), 4, "{accounts}");
    let account = columns[0].to_owned();
    assert_eq!(account.len(), 32);
    assert_eq!(&columns[1..], &["Bank", server.as_str(), "alice"]);

    // A one-shot login with --yes: the business system sees the user logged in.
    let qr = served.session(&server, &token, &nonce(1), 0);
    let out = device_ok(home, &["login", qr.to_str().unwrap(), "--yes"], "");
    assert!(out.contains("announce: Log in to the bank"), "{out}");
    assert!(out.contains("state: done (logged in once)"), "{out}");
    assert!(
        out.contains(&format!("logged in as alice at Bank (account {account})")),
        "{out}"
    );
    let position = served.wait_for_state(&server, &token, &nonce(1), "logged_in");
    let view = served.call(
        Method::GET,
        &format!(
            "/v1/servers/{server}/sessions/{}?min_position={position}",
            nonce(1)
        ),
        &token,
        None,
    );
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["userid"], "alice");
    assert_eq!(view["account_id"], account.as_str());
    assert_eq!(view["attributes"]["name"], "Alice Martin");

    // The same through the prompt: pick account 1, confirm.
    let qr = served.session(&server, &token, &nonce(2), 0);
    let out = device_ok(home, &["login", qr.to_str().unwrap()], "1\ny\n");
    assert!(
        out.contains(&format!("  1. alice (account {account})")),
        "{out}"
    );
    assert!(out.contains("Account [1]: "), "{out}");
    assert!(out.contains("Log in as alice at Bank? [y/N] "), "{out}");
    assert!(out.contains("state: done (logged in once)"), "{out}");
    served.wait_for_state(&server, &token, &nonce(2), "logged_in");

    // Declined at the prompt: the device aborts the session, the server hears it.
    let qr = served.session(&server, &token, &nonce(3), 0);
    let out = device(home, &["login", qr.to_str().unwrap()], "\nn\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("login declined"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("state: done (aborted)"));
    served.wait_for_state(&server, &token, &nonce(3), "aborted");

    // A continuous session stays up until the business system logs it out.
    let qr = served.session(&server, &token, &nonce(4), 30);
    let (mut child, lines, seen) = continuous_login(home, &qr);
    assert!(seen.contains("state: active (logged in)"), "{seen}");
    served.wait_for_state(&server, &token, &nonce(4), "logged_in");
    served.call(
        Method::DELETE,
        &format!("/v1/servers/{server}/sessions/{}", nonce(4)),
        &token,
        None,
    );
    let tail = rest(lines);
    assert!(child.wait().unwrap().success(), "{tail}");
    assert!(tail.contains("state: done (logged out)"), "{tail}");
    assert!(tail.contains("logged out by the server"), "{tail}");

    // ... or until SIGTERM, which logs out first.
    let qr = served.session(&server, &token, &nonce(5), 30);
    let (mut child, lines, _) = continuous_login(home, &qr);
    // `kill(1)`: the workspace forbids `unsafe`, so no `libc::kill`.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let tail = rest(lines);
    assert!(child.wait().unwrap().success(), "{tail}");
    assert!(tail.contains("interrupted: logging out"), "{tail}");
    served.wait_for_state(&server, &token, &nonce(5), "logged_out");

    let history = device_ok(home, &["history"], "");
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{history}");
    assert!(
        rows[0].contains("enrolment") && rows[0].ends_with("enrolled"),
        "{history}"
    );
    let once = rows
        .iter()
        .filter(|r| r.contains("login") && r.contains("Bank") && r.ends_with("logged in once"))
        .count();
    assert_eq!(once, 2, "{history}");
    assert!(rows[3].ends_with("aborted"), "{history}");
    assert!(
        rows[4].ends_with("logged out") && rows[5].ends_with("logged out"),
        "{history}"
    );

    // A device without an account at this server: NOACCOUNTS, and the server hears it.
    let stranger = served.dir.path().join("stranger");
    let qr = served.session(&server, &token, &nonce(6), 0);
    let out = device(&stranger, &["login", qr.to_str().unwrap(), "--yes"], "");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no account for this server on this device"),
        "{stderr}"
    );
    served.wait_for_state(&server, &token, &nonce(6), "failed");
    // An enrolment code is not a login code.
    let out = device(home, &["login", enrolment.to_str().unwrap(), "--yes"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("enrolment QR code"));

    // The device deletes its account: the server forgets it too.
    let out = device_ok(home, &["delete-account", &account], "");
    assert!(out.contains(&format!("deleted account {account}")), "{out}");
    assert!(device_ok(home, &["accounts"], "").contains("no accounts on this device"));
    // Any later write's position is past the deletion: read the accounts from there.
    let (status, headers, _) = served.request(
        Method::PUT,
        &format!("/v1/servers/{server}/sessions/{}", nonce(7)),
        &token,
        Some(json!({})),
    );
    assert_eq!(status, StatusCode::CREATED);
    let position = headers["x-countersign-position"]
        .to_str()
        .unwrap()
        .to_owned();
    let listed = served.call(
        Method::GET,
        &format!("/v1/servers/{server}/users/alice/accounts?min_position={position}"),
        &token,
        None,
    );
    assert_eq!(listed["accounts"], json!([]), "{listed}");
}
