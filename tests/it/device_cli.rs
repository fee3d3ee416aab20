//! `countersign device`, the virtual phone, as a user runs it: `countersign serve` as a child
//! process on a temporary SQLite database, the business system as an HTTP client, and the
//! `device` subcommand reading the QR codes as PNG images the API drew. Enrolment, one-shot
//! logins with `--yes` and through the prompt, a declined login, continuous sessions ended by
//! the server and by SIGTERM, NOACCOUNTS on a fresh device, the history, and deleting the
//! account from the device. On a server whose logins need a PIN: the first enrolment registers
//! it at the served SFS (trusted on first use), logins with the right and wrong PINs (from
//! `--pin`, the environment and the prompt), change-pin, a biometric key, and upgrading a
//! headless account; the PIN never reaches the output.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::next_state;
use crate::binary::binary;

/// `countersign serve` in a child process, killed when the test ends.
pub(crate) struct Served {
    child: Child,
    base: String,
    admin_key: String,
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
    pub(crate) dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    pub(crate) fn start() -> Self {
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
        self.send(method, path, token, None, body)
    }

    /// A call on the login session of `nonce`, named as integrators should: in `X-Nonce`, with
    /// `path` the session's header-form path (`/v1/servers/{server}/session…`).
    fn session_request(
        &self,
        method: Method,
        path: &str,
        token: &str,
        nonce: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        self.send(method, path, token, Some(nonce), body)
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        nonce: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        self.runtime.block_on(async {
            let mut request = self
                .http
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(token);
            if let Some(nonce) = nonce {
                request = request.header("X-Nonce", nonce);
            }
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

    /// [`Self::call`] on the login session of `nonce` ([`Self::session_request`]).
    pub(crate) fn session_call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        nonce: &str,
        body: Option<Value>,
    ) -> Value {
        let (status, _, bytes) = self.session_request(method.clone(), path, token, nonce, body);
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    /// Fetches a PNG image and writes it into the test's folder.
    pub(crate) fn png(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        name: &str,
    ) -> PathBuf {
        self.save_png(path, self.request(method, path, token, body), name)
    }

    /// Writes the PNG image answered to `path` into the test's folder.
    fn save_png(
        &self,
        path: &str,
        (status, headers, bytes): (StatusCode, reqwest::header::HeaderMap, Vec<u8>),
        name: &str,
    ) -> PathBuf {
        assert!(status.is_success(), "{path}: {status}");
        assert_eq!(headers["content-type"], "image/png");
        let file = self.dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        file
    }

    /// A server whose logins need no second factor, an API key, and user alice with
    /// attributes: (server id, token).
    fn tenant(&self) -> (String, String) {
        self.tenant_with("none")
    }

    /// The same with the second-factor policy `policy` (`none`, `pin`, ...).
    pub(crate) fn tenant_with(&self, policy: &str) -> (String, String) {
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
            Some(json!({"second_factor": policy})),
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
        let opened = self.session_call(
            Method::PUT,
            &format!("/v1/servers/{server}/session"),
            token,
            nonce,
            Some(json!({"ping_time_secs": ping_time_secs, "announce_info": "Log in to the bank"})),
        );
        let position = opened["position"].as_u64().unwrap();
        let qr = format!("/v1/servers/{server}/session/qr?format=png&min_position={position}");
        let answer = self.session_request(Method::GET, &qr, token, nonce, None);
        self.save_png(&qr, answer, &format!("{nonce}.png"))
    }

    /// Follows the session's event stream until `state`; answers its log position.
    fn wait_for_state(&self, server: &str, token: &str, nonce: &str, state: &str) -> u64 {
        self.runtime.block_on(async {
            let response = self
                .http
                .get(format!("{}/v1/servers/{server}/session/events", self.base))
                .header("X-Nonce", nonce)
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

pub(crate) fn device_command(home: &Path, args: &[&str]) -> Command {
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

pub(crate) fn device_ok(home: &Path, args: &[&str], stdin: &str) -> String {
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

pub(crate) fn rest(lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) -> String {
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
    assert_eq!(columns.len(), 5, "{accounts}");
    let account = columns[0].to_owned();
    assert_eq!(account.len(), 32);
    // On a server that asks no second factor the account stays headless.
    assert_eq!(
        &columns[1..],
        &["Bank", server.as_str(), "headless", "alice"]
    );

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
    let view = served.session_call(
        Method::GET,
        &format!("/v1/servers/{server}/session?min_position={position}"),
        &token,
        &nonce(1),
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
    served.session_call(
        Method::DELETE,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce(4),
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
    let (status, headers, _) = served.session_request(
        Method::PUT,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce(7),
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

const PIN: &str = "2468";
const NEW_PIN: &str = "8642";

/// The account rows of `device accounts`: (account id, factor column).
fn account_rows(home: &Path) -> Vec<(String, String)> {
    device_ok(home, &["accounts"], "")
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("second-factor server:"))
        .map(|l| {
            let columns: Vec<&str> = l.split_whitespace().collect();
            (columns[0].to_owned(), columns[3].to_owned())
        })
        .collect()
}

/// Asserts that none of `pins` is in the command's stdout or stderr, once the ids and the
/// URL that may hold digits by chance are taken out.
fn assert_no_pin(out: &Output, pins: &[&str], known: &[&str]) {
    for stream in [&out.stdout, &out.stderr] {
        let mut text = String::from_utf8_lossy(stream).into_owned();
        for noise in known {
            text = text.replace(noise, "<id>");
        }
        for pin in pins {
            assert!(!text.contains(pin), "the PIN {pin} was printed:\n{text}");
        }
    }
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_virtual_phone_gives_its_pin_when_the_server_asks_one() {
    let served = Served::start();
    let (server, token) = served.tenant_with("pin");
    let home = served.dir.path().join("phone");
    let home = home.as_path();
    let login = |n: u8, args: &[&str], stdin: &str| {
        let qr = served.session(&server, &token, &nonce(n), 0);
        let mut all = vec!["login", qr.to_str().unwrap(), "--yes"];
        all.extend_from_slice(args);
        device(home, &all, stdin)
    };

    // The first enrolment finds the SFS next to the gateway, pins its keys and registers the
    // PIN there; the new account is not headless.
    let enrolment = served.png(
        Method::POST,
        &format!("/v1/servers/{server}/enrolments?format=png"),
        &token,
        Some(json!({"userid": "alice"})),
        "enrol.png",
    );
    let out = device(
        home,
        &["enrol", enrolment.to_str().unwrap(), "--yes", "--pin", PIN],
        "",
    );
    let stdout = stdout_of(&out);
    assert!(out.status.success(), "{}\n{stdout}", stderr_of(&out));
    let sfs = format!("{}/v1/sfs", served.base.replacen("http://", "ws://", 1));
    assert!(
        stdout.contains(&format!(
            "second-factor server: {sfs} (trusted on first use"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("state: waiting for a second factor"),
        "{stdout}"
    );
    assert!(stdout.contains("second factor verified"), "{stdout}");
    assert!(stdout.contains("state: done (enrolled)"), "{stdout}");
    assert!(home.join("sfs.json").is_file());
    let rows = account_rows(home);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (account, factor) = rows[0].clone();
    assert_eq!(
        factor, "yes",
        "the account has a second factor, not headless"
    );
    // The port may hold the PIN's digits by chance.
    let host = served.base.trim_start_matches("http://");
    let known = [account.as_str(), server.as_str(), host];
    assert_no_pin(&out, &[PIN], &known);

    // A login with the right PIN: the business system sees the user logged in, and the
    // account with its PIN.
    let out = login(1, &["--pin", PIN], "");
    let stdout = stdout_of(&out);
    assert!(out.status.success(), "{}\n{stdout}", stderr_of(&out));
    assert!(stdout.contains("second factor verified"), "{stdout}");
    assert!(stdout.contains("state: done (logged in once)"), "{stdout}");
    assert_no_pin(&out, &[PIN], &known);
    let position = served.wait_for_state(&server, &token, &nonce(1), "logged_in");
    let view = served.session_call(
        Method::GET,
        &format!("/v1/servers/{server}/session?min_position={position}"),
        &token,
        &nonce(1),
        None,
    );
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["account_id"], account.as_str());
    let listed = served.call(
        Method::GET,
        &format!("/v1/servers/{server}/users/alice/accounts?min_position={position}"),
        &token,
        None,
    );
    assert_eq!(listed["accounts"][0]["second_factor"], "pin", "{listed}");

    // A wrong `--pin`: exit 1 with the attempts left, and the session is given up.
    let out = login(2, &["--pin", "0000"], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_of(&out);
    assert!(stderr.contains("wrong PIN: 4 attempts left"), "{stderr}");
    assert!(stdout_of(&out).contains("state: done (aborted)"));
    assert_no_pin(&out, &[PIN, "0000"], &known);
    served.wait_for_state(&server, &token, &nonce(2), "aborted");

    // At the prompt a wrong PIN is told and asked again; the failures are consecutive.
    let out = login(3, &[], "1357\n2468\n");
    let stdout = stdout_of(&out);
    assert!(out.status.success(), "{}\n{stdout}", stderr_of(&out));
    assert_eq!(
        stdout.lines().filter(|l| *l == "PIN: ").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("wrong PIN: 3 attempts left"), "{stdout}");
    assert!(stdout.contains("state: done (logged in once)"), "{stdout}");
    assert_no_pin(&out, &[PIN, "1357"], &known);
    served.wait_for_state(&server, &token, &nonce(3), "logged_in");

    // Change the PIN; the old one no longer works, the new one (from the environment) does.
    let out = device(
        home,
        &["change-pin", "--pin", PIN, "--new-pin", NEW_PIN],
        "",
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("PIN changed"));
    assert_no_pin(&out, &[PIN, NEW_PIN], &known);
    let out = login(4, &["--pin", PIN], "");
    assert!(stderr_of(&out).contains("wrong PIN: 4 attempts left"));
    let qr = served.session(&server, &token, &nonce(5), 0);
    let out = device_command(home, &["login", qr.to_str().unwrap(), "--yes"])
        .env("COUNTERSIGN_DEVICE_PIN", NEW_PIN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_no_pin(&out, &[NEW_PIN], &known);
    served.wait_for_state(&server, &token, &nonce(5), "logged_in");

    // A biometric key, registered with the PIN, enrols and logs in where the server allows
    // it; a failed check does not.
    let out = device(home, &["register-biometric"], &format!("{NEW_PIN}\n"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_no_pin(&out, &[NEW_PIN], &known);
    let (bio, bio_token) = served.tenant_with("pin_or_biometric");
    let enrolment = served.png(
        Method::POST,
        &format!("/v1/servers/{bio}/enrolments?format=png"),
        &bio_token,
        Some(json!({"userid": "alice"})),
        "bio.png",
    );
    let out = device(
        home,
        &["enrol", enrolment.to_str().unwrap(), "--yes", "--biometric"],
        "",
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(account_rows(home)[1].1, "yes");
    let bio_login = |n: u8, flag: &str| {
        let qr = served.session(&bio, &bio_token, &nonce(n), 0);
        device(home, &["login", qr.to_str().unwrap(), "--yes", flag], "")
    };
    let out = bio_login(6, "--biometric");
    assert!(out.status.success(), "{}", stderr_of(&out));
    served.wait_for_state(&bio, &bio_token, &nonce(6), "logged_in");
    let out = bio_login(7, "--biometric-fail");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("the biometric check failed"));
    served.wait_for_state(&bio, &bio_token, &nonce(7), "aborted");

    // An account enrolled where no second factor is asked stays headless until upgraded.
    let (plain, plain_token) = served.tenant_with("none");
    let enrolment = served.png(
        Method::POST,
        &format!("/v1/servers/{plain}/enrolments?format=png"),
        &plain_token,
        Some(json!({"userid": "alice"})),
        "plain.png",
    );
    device_ok(home, &["enrol", enrolment.to_str().unwrap(), "--yes"], "");
    let rows = account_rows(home);
    let (headless, factor) = rows[2].clone();
    assert_eq!(factor, "headless", "{rows:?}");
    let out = device(home, &["upgrade", &headless, "--pin", NEW_PIN], "");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("it now has a second factor"));
    assert_eq!(account_rows(home)[2], (headless, "yes".to_owned()));
}
