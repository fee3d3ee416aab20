//! The Data Service contract over real sockets: the NS's client
//! (`countersign_device_gateway::data_service`) against `tests/ds/ds_verify.py`, an independent
//! DS in Python (`cryptography` + the standard library, written from `docs/data-service.md`),
//! and against `countersign ds-echo` (the Rust verifier). The Python DS must accept what the
//! NS signs and refuse a tampered body, header or signature and a replay; a DS that fails,
//! hangs or is not there must come back as the right `DsError`.
//!
//! The Python tests skip, saying so, when `python3 -c 'import cryptography'` fails (`.ci/test`
//! installs it). [`PythonDs`] is shared with the secure-channel tests.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use countersign_device_gateway::data_service::{
    DataServiceClient, DsAnswer, DsError, DsRequest, DsSigner, DsTarget, MAX_DS_ANSWER_BYTES,
    MAX_DS_REQUEST_BYTES, check_url,
};
use countersign_domain::{AccountId, AppInstanceId, ServerId};
use p256::ecdsa::SigningKey;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// `tests/ds/ds_verify.py` on a free port, its stdout records on a channel.
pub struct PythonDs {
    child: Child,
    /// Where it listens: `http://127.0.0.1:{port}/ds`.
    pub url: String,
    records: mpsc::UnboundedReceiver<Value>,
}

impl PythonDs {
    /// Whether the Python DS can run here; prints why not when it cannot.
    pub fn available() -> bool {
        let ok = Command::new("python3")
            .args(["-c", "import cryptography"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: python3 with the `cryptography` package is not available \
                 (pip install cryptography; .ci/test does it)"
            );
        }
        ok
    }

    /// Starts it, trusting `public_key` (SEC1 hex); `fail_status` makes it answer that status
    /// to every request it verified.
    pub fn start(public_key: &str, fail_status: Option<u16>) -> Self {
        Self::start_with(public_key, fail_status, None)
    }

    /// As [`PythonDs::start`], serving HTTPS with `tls` (certificate file, key file) when given.
    pub fn start_with(
        public_key: &str,
        fail_status: Option<u16>,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/ds/ds_verify.py");
        let mut command = Command::new("python3");
        command
            .args([script, "--port", "0", "--public-key", public_key])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(status) = fail_status {
            command.args(["--fail-status", &status.to_string()]);
        }
        if let Some((cert, key)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let mut child = command.spawn().expect("python3 runs");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let port: u16 = first.trim().parse().expect("the DS prints its port first");
        let (tx, records) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let Ok(record) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send(record).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            url: format!(
                "{}://localhost:{port}/ds",
                if tls.is_some() { "https" } else { "http" }
            ),
            records,
        }
    }

    /// The record of the next request it handled.
    pub async fn next_record(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.records.recv())
            .await
            .expect("the DS handled a request")
            .expect("the DS is running")
    }
}

impl Drop for PythonDs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Rig {
    client: DataServiceClient,
    signer: DsSigner,
    key: SigningKey,
    server: ServerId,
}

impl Rig {
    fn new() -> Self {
        let mut secret = [0u8; 32];
        let key = loop {
            getrandom::fill(&mut secret).unwrap();
            if let Ok(key) = SigningKey::from_slice(&secret) {
                break key;
            }
        };
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).unwrap();
        let server = ServerId::from_bytes(id);
        Self {
            client: DataServiceClient::new(),
            signer: DsSigner::new(server, &secret).unwrap(),
            key,
            server,
        }
    }

    fn public_hex(&self) -> String {
        hex::encode(self.signer.public_key_sec1())
    }

    fn request<'a>(&self, userid: Option<&'a str>, data: &'a [u8]) -> DsRequest<'a> {
        let mut request_id = [0u8; 16];
        getrandom::fill(&mut request_id).unwrap();
        DsRequest {
            server_id: self.server,
            account_id: AccountId::from_bytes([0xac; 16]),
            userid,
            headless: userid.is_none(),
            app_instance: AppInstanceId::from_bytes([0xa1; 16]),
            request_id,
            created_secs: now_secs(),
            data,
        }
    }

    async fn call(&self, url: &str, request: &DsRequest<'_>) -> Result<DsAnswer, DsError> {
        self.client
            .call(&DsTarget { url, timeout: WAIT }, &self.signer, request)
            .await
    }

    /// The headers the NS would send for `request` to `url`, for hand-made (tampered,
    /// replayed) requests.
    fn signed_headers(
        &self,
        url: &str,
        request: &DsRequest<'_>,
        nonce: [u8; 16],
    ) -> Vec<(&'static str, String)> {
        request.message(url, nonce).sign(&self.key)
    }
}

// The test is an edge: the DS checks `created` against its own clock.
#[allow(clippy::disallowed_methods)]
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn post(url: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Vec<u8>) {
    let mut request = reqwest::Client::new().post(url).body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn the_python_ds_verifies_what_the_ns_signs_and_gets_who_sent_it() {
    if !PythonDs::available() {
        return;
    }
    let rig = Rig::new();
    let mut ds = PythonDs::start(&rig.public_hex(), None);
    for userid in [Some("jos\u{e9}@example.com"), None] {
        let data = b"\x00app data\xff".repeat(100);
        let request = rig.request(userid, &data);
        let answer = rig.call(&ds.url, &request).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, data, "the echo is the data");
        let record = ds.next_record().await;
        assert_eq!(record["outcome"], "delivered", "{record}");
        assert_eq!(record["server"], rig.server.to_string());
        assert_eq!(record["account"], "ac".repeat(16));
        assert_eq!(record["user"], userid.map_or(Value::Null, Value::from));
        assert_eq!(record["headless"], userid.is_none());
        assert_eq!(record["app_instance"], "a1".repeat(16));
        assert_eq!(record["request_id"], hex::encode(request.request_id));
        assert_eq!(record["body_len"], data.len());
    }
    // The largest request, and an empty one.
    let big = vec![7u8; MAX_DS_REQUEST_BYTES];
    let answer = rig.call(&ds.url, &rig.request(None, &big)).await.unwrap();
    assert_eq!((answer.status, answer.body.len()), (200, big.len()));
    let answer = rig.call(&ds.url, &rig.request(None, b"")).await.unwrap();
    assert_eq!((answer.status, answer.body), (200, Vec::new()));
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_gets_the_first_answer() {
    if !PythonDs::available() {
        return;
    }
    let rig = Rig::new();
    let mut ds = PythonDs::start(&rig.public_hex(), None);
    let request = rig.request(Some("alice"), b"pay 10");
    let first = rig.call(&ds.url, &request).await.unwrap();
    assert_eq!(ds.next_record().await["outcome"], "delivered");
    // Same request id, other data: a retry is answered from the DS's memory, not acted on.
    let retry = DsRequest {
        data: b"pay 20",
        ..request
    };
    let again = rig.call(&ds.url, &retry).await.unwrap();
    assert_eq!(ds.next_record().await["outcome"], "repeat");
    assert_eq!(again, first);
}

#[tokio::test]
async fn the_python_ds_refuses_tampered_and_replayed_requests() {
    if !PythonDs::available() {
        return;
    }
    let rig = Rig::new();
    let mut ds = PythonDs::start(&rig.public_hex(), None);
    let data = b"transfer 10 EUR".to_vec();
    let request = rig.request(Some("alice"), &data);
    let mut nonce = [0u8; 16];
    let fresh = |nonce: &mut [u8; 16]| getrandom::fill(nonce).unwrap();
    let set = |headers: &mut Vec<(&'static str, String)>, name: &str, value: String| {
        for header in headers.iter_mut() {
            if header.0 == name {
                header.1 = value.clone();
            }
        }
    };

    fresh(&mut nonce);
    let signed = rig.signed_headers(&ds.url, &request, nonce);
    let (status, body) = post(&ds.url, &signed, b"transfer 99 EUR").await;
    assert_eq!(status, 401, "a tampered body");
    assert_eq!(body, b"refused: content-digest");
    assert_eq!(ds.next_record().await["outcome"], "refused");

    for (name, value) in [
        ("countersign-account", "bd".repeat(16)),
        ("countersign-user", ":Ym9i:".to_owned()),
        ("countersign-headless", "?1".to_owned()),
        ("countersign-request-id", "00".repeat(16)),
        (
            "content-digest",
            countersign_protocol::data_service::content_digest(b"x"),
        ),
    ] {
        fresh(&mut nonce);
        let mut headers = rig.signed_headers(&ds.url, &request, nonce);
        set(&mut headers, name, value);
        let body = if name == "content-digest" {
            b"x".to_vec()
        } else {
            data.clone()
        };
        let (status, answer) = post(&ds.url, &headers, &body).await;
        assert_eq!(status, 401, "{name} changed");
        assert_eq!(answer, b"refused: bad signature", "{name} changed");
        assert_eq!(ds.next_record().await["reason"], "bad signature");
    }

    // The signature itself, one bit flipped.
    fresh(&mut nonce);
    let mut headers = rig.signed_headers(&ds.url, &request, nonce);
    let signature = headers
        .iter()
        .find(|(n, _)| *n == "signature")
        .unwrap()
        .1
        .clone();
    let flipped = if signature.as_bytes()[10] == b'A' {
        "B"
    } else {
        "A"
    };
    let tampered = format!("{}{flipped}{}", &signature[..10], &signature[11..]);
    set(&mut headers, "signature", tampered);
    let (status, _) = post(&ds.url, &headers, &data).await;
    assert_eq!(status, 401, "a tampered signature");
    assert_eq!(ds.next_record().await["reason"], "bad signature");

    // Signed by another key.
    let other = Rig::new();
    fresh(&mut nonce);
    let foreign = other.signed_headers(
        &ds.url,
        &DsRequest {
            server_id: rig.server,
            ..request
        },
        nonce,
    );
    let (status, _) = post(&ds.url, &foreign, &data).await;
    assert_eq!(status, 401, "another key");
    assert_eq!(ds.next_record().await["reason"], "bad signature");

    // A header the signature does not cover: a user claimed on a headless request.
    fresh(&mut nonce);
    let headless = DsRequest {
        userid: None,
        ..request
    };
    let mut headers = rig.signed_headers(&ds.url, &headless, nonce);
    headers.push(("countersign-user", ":YWxpY2U=:".to_owned()));
    let (status, _) = post(&ds.url, &headers, &data).await;
    assert_eq!(status, 401, "an uncovered user");
    assert_eq!(
        ds.next_record().await["reason"],
        "countersign-user not covered"
    );

    // Too old.
    fresh(&mut nonce);
    let old = DsRequest {
        created_secs: now_secs() - 3600,
        ..request
    };
    let (status, _) = post(&ds.url, &rig.signed_headers(&ds.url, &old, nonce), &data).await;
    assert_eq!(status, 401, "a stale request");
    assert_eq!(ds.next_record().await["reason"], "stale");

    // Sent to another URL than it was signed for.
    fresh(&mut nonce);
    let elsewhere = rig.signed_headers("http://127.0.0.1:1/ds", &request, nonce);
    let (status, _) = post(&ds.url, &elsewhere, &data).await;
    assert_eq!(status, 401, "another target");
    assert_eq!(ds.next_record().await["reason"], "bad signature");

    // The same signed request twice: the first is delivered, the replay refused.
    fresh(&mut nonce);
    let signed = rig.signed_headers(&ds.url, &request, nonce);
    let (status, body) = post(&ds.url, &signed, &data).await;
    assert_eq!((status, body), (200, data.clone()));
    assert_eq!(ds.next_record().await["outcome"], "delivered");
    let (status, body) = post(&ds.url, &signed, &data).await;
    assert_eq!(status, 401, "a replay");
    assert_eq!(body, b"refused: replayed");
    assert_eq!(ds.next_record().await["reason"], "replayed");
}

#[tokio::test]
async fn a_failing_ds_is_a_server_error() {
    if !PythonDs::available() {
        return;
    }
    let rig = Rig::new();
    let mut ds = PythonDs::start(&rig.public_hex(), Some(500));
    let result = rig.call(&ds.url, &rig.request(None, b"x")).await;
    assert_eq!(result, Err(DsError::ServerError { status: 500 }));
    assert_eq!(
        ds.next_record().await["outcome"],
        "failed",
        "it verified, then failed"
    );
}

/// A DS that accepts connections and never answers.
pub(crate) async fn silent_ds() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ds", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// A DS that answers every request with `response` (raw HTTP/1.1 bytes) after reading it.
async fn canned_ds(response: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ds", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut seen = Vec::new();
                // Read the head and the Content-Length body, then answer.
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_silent_ds_times_out() {
    let rig = Rig::new();
    let (url, task) = silent_ds().await;
    let result = rig
        .client
        .call(
            &DsTarget {
                url: &url,
                timeout: Duration::from_millis(200),
            },
            &rig.signer,
            &rig.request(None, b"x"),
        )
        .await;
    assert_eq!(result, Err(DsError::Timeout));
    task.abort();
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let rig = Rig::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ds", listener.local_addr().unwrap());
    drop(listener);
    assert_eq!(
        rig.call(&url, &rig.request(None, b"x")).await,
        Err(DsError::Unreachable)
    );
}

#[tokio::test]
async fn statuses_and_sizes_of_the_answer() {
    let rig = Rig::new();
    let answer = |status: &str, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    // A 4xx is the DS's answer to the app.
    let (url, task) = canned_ds(answer("409 Conflict", b"already paid")).await;
    let got = rig.call(&url, &rig.request(None, b"x")).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_slice()),
        (409, &b"already paid"[..])
    );
    task.abort();
    // A redirect is not followed: signed data goes only where the admin pointed it.
    let (url, task) = canned_ds(
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert_eq!(
        rig.call(&url, &rig.request(None, b"x")).await,
        Err(DsError::ServerError { status: 307 })
    );
    task.abort();
    // 503 is a server error.
    let (url, task) = canned_ds(answer("503 Service Unavailable", b"")).await;
    assert_eq!(
        rig.call(&url, &rig.request(None, b"x")).await,
        Err(DsError::ServerError { status: 503 })
    );
    task.abort();
    // The largest answer passes, one byte more does not (announced, or streamed unannounced).
    let (url, task) = canned_ds(answer("200 OK", &vec![1u8; MAX_DS_ANSWER_BYTES])).await;
    let got = rig.call(&url, &rig.request(None, b"x")).await.unwrap();
    assert_eq!(got.body.len(), MAX_DS_ANSWER_BYTES);
    task.abort();
    let (url, task) = canned_ds(answer("200 OK", &vec![1u8; MAX_DS_ANSWER_BYTES + 1])).await;
    assert_eq!(
        rig.call(&url, &rig.request(None, b"x")).await,
        Err(DsError::AnswerTooLarge)
    );
    task.abort();
    let mut unannounced = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    unannounced.extend(vec![1u8; MAX_DS_ANSWER_BYTES + 1]);
    let (url, task) = canned_ds(unannounced).await;
    assert_eq!(
        rig.call(&url, &rig.request(None, b"x")).await,
        Err(DsError::AnswerTooLarge)
    );
    task.abort();
}

#[tokio::test]
async fn bad_urls_and_oversize_data_send_nothing() {
    let rig = Rig::new();
    // A listener that would see any request: nothing may reach it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for url in [
        "ftp://127.0.0.1/ds".to_owned(),
        "/ds".to_owned(),
        format!("http://user:pw@{addr}/ds"),
        format!("http://{addr}/ds#frag"),
        "not a url".to_owned(),
    ] {
        assert_eq!(check_url(&url), Err(DsError::BadUrl), "{url}");
        assert_eq!(
            rig.call(&url, &rig.request(None, b"x")).await,
            Err(DsError::BadUrl),
            "{url}"
        );
    }
    assert_eq!(
        check_url("HTTP://Example.COM:80").unwrap(),
        "http://example.com/",
        "normalised as signed"
    );
    let oversize = vec![0u8; MAX_DS_REQUEST_BYTES + 1];
    assert_eq!(
        rig.call(&format!("http://{addr}/ds"), &rig.request(None, &oversize))
            .await,
        Err(DsError::RequestTooLarge)
    );
    let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
    assert!(accepted.is_err(), "no connection was made");
    assert!(matches!(
        DsSigner::new(rig.server, &[0u8; 32]),
        Err(DsError::Key)
    ));
    assert!(matches!(
        DsSigner::new(rig.server, b"short"),
        Err(DsError::Key)
    ));
}

#[tokio::test]
async fn ds_echo_verifies_with_the_rust_verifier() {
    let rig = Rig::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ds", listener.local_addr().unwrap());
    let key = countersign::ds_echo::parse_public_key(&rig.public_hex()).unwrap();
    let task = tokio::spawn(countersign::ds_echo::serve(
        listener,
        countersign::ds_echo::EchoConfig {
            key,
            url: None,
            window_secs: 300,
        },
    ));
    let request = rig.request(Some("alice"), b"hello ds");
    let answer = rig.call(&url, &request).await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &b"hello ds"[..])
    );
    // A retry (same request id, new nonce) is answered from memory.
    let retry = DsRequest {
        data: b"other",
        ..request
    };
    assert_eq!(rig.call(&url, &retry).await.unwrap().body, b"hello ds");
    // A replay and a tampered body are refused.
    let signed = rig.signed_headers(&url, &rig.request(None, b"once"), [9; 16]);
    assert_eq!(post(&url, &signed, b"once").await.0, 200);
    assert_eq!(
        post(&url, &signed, b"once").await,
        (401, b"refused: replayed".to_vec())
    );
    let signed = rig.signed_headers(&url, &rig.request(None, b"once"), [8; 16]);
    assert_eq!(post(&url, &signed, b"twice").await.0, 401);
    // Another server's key is refused.
    let other = Rig::new();
    assert_eq!(
        other
            .call(&url, &other.request(None, b"x"))
            .await
            .unwrap()
            .status,
        401
    );
    task.abort();
}

/// A test CA (PEM) and a certificate chain and key for `localhost` it issued, in `dir`.
fn test_certificates(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (ca_cert.pem(), cert, key)
}

#[tokio::test]
async fn an_https_ds_is_reached_when_its_ca_is_trusted() {
    if !PythonDs::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let mut rig = Rig::new();
    let mut ds = PythonDs::start_with(&rig.public_hex(), None, Some((&cert, &key)));
    assert!(ds.url.starts_with("https://localhost:"));
    // The system's roots do not know the test CA: the handshake fails, nothing is delivered.
    assert_eq!(
        rig.call(&ds.url, &rig.request(None, b"x")).await,
        Err(DsError::Unreachable)
    );
    rig.client = DataServiceClient::with_extra_ca(&ca).unwrap();
    let request = rig.request(Some("alice"), b"over tls");
    let answer = rig.call(&ds.url, &request).await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &b"over tls"[..])
    );
    let record = ds.next_record().await;
    assert_eq!(record["outcome"], "delivered", "{record}");
    assert_eq!(record["request_id"], hex::encode(request.request_id));
    assert!(DataServiceClient::with_extra_ca("not pem").is_err());
}
