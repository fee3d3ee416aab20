//! `countersign bench oidc`: the OpenID Connect provider against a running server, a virtual
//! phone (the SDK) and HTTP clients in this process.
//!
//! Setup: a server whose sessions are continuous and whose logins ask a PIN, one phone, one
//! confidential client; one whole browser login through the hosted page (authorize → the
//! page → its QR → the phone logs in with the PIN → continue → code), which leaves the
//! browser an SSO cookie. Then, each phase at `--concurrency`:
//! - **authorize (SSO)**: the authorization endpoint with the cookie answers a code at once
//!   (one `grant.code_issued` each); the codes are kept for the next phase;
//! - **code → token**: each code exchanged once at the token endpoint (client_secret_basic),
//!   until the codes run out or `--seconds` pass;
//! - **userinfo (cold)**: every access token of the exchanges in turn, each asked about about
//!   once a second, so each answer reads the grant, the session and the user;
//! - **userinfo (hot)**: 16 of them, round robin: a resource server asking about the tokens of
//!   the requests it serves (answered from the one-second cache);
//! - **/healthz**: the same client and concurrency against the cheapest route: the ceiling;
//! - **login page**: `--page-clients` clients loading the hosted page (a fresh authorization's
//!   cookie), time to first byte.
//!
//! Speed is reported, never asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use countersign_mobile_sdk::{
    HistoryStatus, Interaction, NoCallbacks, SecondFactor, SfsConfig, State as SdkState,
};
use futures::StreamExt as _;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

use super::app::{Phase, phase, print};
use super::device::{Business, admin_key, histogram, ms, random};
use super::transactions::{PIN, Phone, enrol_phones};

#[derive(Debug, clap::Args)]
pub struct OidcArgs {
    /// The running server's base URL (API, IdP, `/v1/device` and `/v1/sfs` on the same
    /// address); it must be the server's `--public-url`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Requests in flight at once in the authorize, token, userinfo and ceiling phases.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Clients loading the login page at once.
    #[arg(long, default_value_t = 200)]
    pub page_clients: usize,
    /// The server's process id, to report its CPU time per request.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The `name=value` pairs of every `Set-Cookie` of an answer, as a `Cookie` header would
/// send them back.
fn cookies_of(answer: &reqwest::Response) -> Vec<String> {
    answer
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter(|pair| {
            pair.split_once('=')
                .is_some_and(|(_, value)| !value.is_empty())
        })
        .map(str::to_owned)
        .collect()
}

/// The value of `name="…"` in an HTML tag or attribute list, after `after`.
fn html_value<'a>(page: &'a str, after: &str, name: &str) -> Option<&'a str> {
    let start = page.find(after)?;
    let rest = page.get(start..)?;
    let key = format!("{name}=\"");
    let at = rest.find(&key)? + key.len();
    let tail = rest.get(at..)?;
    tail.get(..tail.find('"')?)
}

/// The query parameter `name` of a URL.
fn query_param(url: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

struct Rp {
    http: reqwest::Client,
    issuer: String,
    client_id: String,
    client_secret: String,
    redirect_uri: String,
}

impl Rp {
    fn authorize_url(&self, state: &str) -> String {
        // PKCE with a fixed verifier: the bench measures the server, not the client.
        let challenge = base64_url(&sha256(VERIFIER.as_bytes()));
        format!(
            "{}/authorize?response_type=code&client_id={}&redirect_uri={}&scope=openid%20profile&state={state}&nonce=n-{state}&code_challenge={challenge}&code_challenge_method=S256",
            self.issuer,
            self.client_id,
            urlencode(&self.redirect_uri),
        )
    }

    /// One authorization with the SSO cookie: the code it redirects back with.
    async fn sso_code(&self, cookie: &str, state: &str) -> anyhow::Result<String> {
        let answer = self
            .http
            .get(self.authorize_url(state))
            .header(COOKIE, cookie)
            .send()
            .await?;
        let location = answer
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .with_context(|| {
                format!("authorize answered {} without a redirect", answer.status())
            })?;
        query_param(location, "code").with_context(|| format!("no code in {location}"))
    }

    /// One code exchanged: the access token.
    async fn exchange(&self, code: &str) -> anyhow::Result<String> {
        let answer: serde_json::Value = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", self.redirect_uri.as_str()),
                ("code_verifier", VERIFIER),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        answer
            .get("access_token")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .context("no access token")
    }
}

const VERIFIER: &str = "bench-verifier-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJ";

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The one whole browser login: answers the SSO cookie the IdP left.
async fn browser_login(rp: &Rp, phone: &Phone) -> anyhow::Result<String> {
    let answer = rp.http.get(rp.authorize_url("first")).send().await?;
    let page_url = answer
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("authorize did not redirect to the login page")?
        .to_owned();
    let page_url = url::Url::parse(&rp.issuer)?.join(&page_url)?;
    let authz = cookies_of(&answer).join("; ");
    let page = rp
        .http
        .get(page_url.clone())
        .header(COOKIE, &authz)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let qr_src = html_value(&page, "id=\"qr\"", "src").context("no QR image on the page")?;
    let png = rp
        .http
        .get(page_url.join(qr_src)?)
        .header(COOKIE, &authz)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let payload = crate::device::read_qr_png(&png).context("reading the page's QR code")?;
    let session = phone
        .sdk
        .start_session(&payload, Arc::new(NoCallbacks))
        .await?;
    let asked = tokio::time::timeout(
        Duration::from_secs(30),
        session.wait_for(|s| {
            matches!(
                s.state,
                SdkState::UserInteraction(Interaction::WaitForSecondFactor) | SdkState::Error
            ) || s.state.is_final()
        }),
    )
    .await?;
    if asked.state != SdkState::UserInteraction(Interaction::WaitForSecondFactor) {
        bail!("the login did not ask for the PIN: {:?}", asked.error);
    }
    session.set_pin_biometric(SecondFactor::pin(PIN)).await?;
    let active = tokio::time::timeout(
        Duration::from_secs(30),
        session.wait_for(|s| s.state == SdkState::Active || s.state.is_final()),
    )
    .await?;
    if active.state != SdkState::Active || active.history_status != Some(HistoryStatus::LoggedIn) {
        bail!("the phone did not log in: {:?}", active.error);
    }
    // Keep the continuous session pinging for the rest of the run.
    std::mem::forget(session);
    let action = html_value(&page, "id=\"continue\"", "action")
        .context("no continue form on the page")?
        .to_owned();
    let csrf = html_value(&page, "name=\"csrf\"", "value")
        .or_else(|| html_value(&page, "csrf", "value"))
        .context("no CSRF token on the page")?;
    // As the page's script does: follow its event stream until the login shows, then continue.
    let events =
        html_value(&page, "id=\"status\"", "data-events").context("no event stream on the page")?;
    let mut stream = rp
        .http
        .get(page_url.join(events)?)
        .header(COOKIE, &authz)
        .send()
        .await?
        .error_for_status()?
        .bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"state\":\"logged_in\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("the login page never heard of the login")?
            .context("the event stream ended before the login")??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let done = rp
        .http
        .post(page_url.join(&action)?)
        .header(COOKIE, &authz)
        .form(&[("csrf", csrf)])
        .send()
        .await?;
    let location = done
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("continue did not redirect")?;
    if query_param(location, "code").is_none() {
        bail!("continue redirected without a code: {location}");
    }
    cookies_of(&done)
        .into_iter()
        .find(|c| c.starts_with("cs_sso="))
        .context("no SSO cookie after the login")
}

async fn register_client(
    business: &Business,
    redirect_uri: &str,
) -> anyhow::Result<(String, String)> {
    let client: serde_json::Value = business
        .http
        .post(business.url("/oidc/clients"))
        .bearer_auth(&*business.token)
        .json(&serde_json::json!({
            "name": "Bench RP",
            "type": "confidential",
            "redirect_uris": [redirect_uri],
            "scopes": ["openid", "profile", "email"],
        }))
        .send()
        .await?
        .error_for_status()
        .context("registering the OIDC client")?
        .json()
        .await?;
    let id = client
        .get("client_id")
        .and_then(|v| v.as_str())
        .context("no client id")?;
    let secret = client
        .get("client_secret")
        .and_then(|v| v.as_str())
        .context("no client secret")?;
    Ok((id.to_owned(), secret.to_owned()))
}

/// Exchanges every code once, `concurrency` at a time, for at most `seconds`.
async fn exchanges(
    rp: &Arc<Rp>,
    codes: Vec<String>,
    concurrency: usize,
    seconds: f64,
    server_pid: Option<u32>,
) -> anyhow::Result<(Phase, Vec<String>)> {
    let codes = Arc::new(codes);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let before = super::device::CpuMark::now(server_pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (rp, codes, next, stop) = (rp.clone(), codes.clone(), next.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            let (mut errors, mut first_error, mut tokens) = (0u64, None, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let Some(code) = codes.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let t0 = Instant::now();
                match rp.exchange(code).await {
                    Ok(token) => {
                        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                        latency.saturating_record(us.max(1));
                        if tokens.len() < 64 {
                            tokens.push(token);
                        }
                    }
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            anyhow::Ok((latency, errors, first_error, tokens))
        }));
    }
    let deadline = tokio::time::sleep(Duration::from_secs_f64(seconds));
    tokio::pin!(deadline);
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    let results = tokio::select! {
        results = &mut all => results,
        () = &mut deadline => {
            stop.store(true, Ordering::Relaxed);
            all.await
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let after = super::device::CpuMark::now(server_pid);
    let mut latency = histogram()?;
    let (mut errors, mut first_error, mut tokens) = (0, None, Vec::new());
    for result in results {
        let (l, e, f, t) = result.context("a worker died")??;
        latency.add(&l)?;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
        tokens.extend(t);
    }
    let count = latency.len();
    #[allow(clippy::cast_precision_loss)]
    let phase = Phase {
        name: "code → token",
        concurrency,
        count,
        errors,
        first_error,
        seconds,
        per_sec: count as f64 / seconds,
        p50_ms: ms(&latency, 0.5),
        p99_ms: ms(&latency, 0.99),
        max_ms: latency.max() as f64 / 1_000.0,
        cpu: Some(before.per(&after, count)),
    };
    Ok((phase, tokens))
}

/// Sends `request` and reads the whole answer, which must be a success: how long that took.
async fn timed_get(request: reqwest::RequestBuilder) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    request.send().await?.error_for_status()?.bytes().await?;
    Ok(t0.elapsed())
}

/// Tokens the hot userinfo phase asks about, round robin.
const HOT_TOKENS: usize = 16;

/// Userinfo with `tokens`, round robin, at the bench's concurrency.
async fn userinfo_phase(
    rp: &Arc<Rp>,
    tokens: Arc<Vec<String>>,
    name: &'static str,
    args: &OidcArgs,
) -> anyhow::Result<Phase> {
    let rp = rp.clone();
    phase(
        name,
        args.concurrency,
        args.seconds,
        args.server_pid,
        move |worker, i| {
            let (rp, tokens) = (rp.clone(), tokens.clone());
            async move {
                let n = usize::try_from(i).unwrap_or(0).wrapping_add(worker) % tokens.len();
                let token = tokens.get(n).context("no token")?;
                timed_get(
                    rp.http
                        .get(format!("{}/userinfo", rp.issuer))
                        .bearer_auth(token),
                )
                .await
            }
        },
    )
    .await
}

pub async fn oidc(args: OidcArgs) -> anyhow::Result<()> {
    super::transactions::check_args(1, args.concurrency, args.seconds)?;
    if args.page_clients == 0 {
        bail!("--page-clients must be at least 1");
    }
    let admin = admin_key()?;
    let pool = args.concurrency.max(args.page_clients) * 2;
    let business = Business::create_with_policy(&args.api, &admin, pool, "pin").await?;
    business
        .http
        .patch(format!("{}/v1/servers/{}", business.base, business.server))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"default_ping_time_secs": 60, "session_timeout_secs": 600}))
        .send()
        .await?
        .error_for_status()
        .context("making the server's sessions continuous")?;
    let sfs = SfsConfig::fetch(&format!("{}/v1/sfs", business.base)).await?;
    let prefix = hex::encode(random::<4>()?);
    let phones = enrol_phones(&business, &sfs, &format!("oidc-{prefix}"), 1, args.json).await?;
    let phone = phones.first().context("no phone")?;
    let redirect_uri = "http://127.0.0.1:9/callback".to_owned();
    let (client_id, client_secret) = register_client(&business, &redirect_uri).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let rp = Arc::new(Rp {
        http,
        issuer: format!("{}/oidc/{}", business.base, business.server),
        client_id,
        client_secret,
        redirect_uri,
    });
    let sso = Arc::new(browser_login(&rp, phone).await?);

    let minted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let authorize = {
        let (rp, sso, minted) = (rp.clone(), sso.clone(), minted.clone());
        phase(
            "authorize (SSO)",
            args.concurrency,
            args.seconds,
            args.server_pid,
            move |worker, i| {
                let (rp, sso, minted) = (rp.clone(), sso.clone(), minted.clone());
                async move {
                    let t0 = Instant::now();
                    let code = rp.sso_code(&sso, &format!("s{worker}x{i}")).await?;
                    let took = t0.elapsed();
                    if let Ok(mut codes) = minted.lock() {
                        codes.push(code);
                    }
                    Ok(took)
                }
            },
        )
        .await?
    };
    let codes = minted
        .lock()
        .map(|mut codes| std::mem::take(&mut *codes))
        .unwrap_or_default();
    let (exchange, tokens) =
        exchanges(&rp, codes, args.concurrency, args.seconds, args.server_pid).await?;
    if tokens.is_empty() {
        bail!("no code was exchanged: {:?}", exchange.first_error);
    }
    let tokens = Arc::new(tokens);
    // Cold: every token of the exchanges in turn (each asked about once a second or less, so
    // the server reads its grant, session and user each time). Hot: a resource server asking
    // about the same few tokens on every request it serves.
    let userinfo_cold = userinfo_phase(&rp, tokens.clone(), "userinfo (cold)", &args).await?;
    let hot = Arc::new(tokens.iter().take(HOT_TOKENS).cloned().collect::<Vec<_>>());
    let userinfo = userinfo_phase(&rp, hot, "userinfo (hot)", &args).await?;
    let ceiling = {
        let rp = rp.clone();
        let url = format!("{}/healthz", business.base);
        phase(
            "/healthz (ceiling)",
            args.concurrency,
            args.seconds,
            args.server_pid,
            move |_, _| {
                let (rp, url) = (rp.clone(), url.clone());
                async move { timed_get(rp.http.get(&url)).await }
            },
        )
        .await?
    };
    // A fresh authorization's page, as a browser that just arrived loads it.
    let first = rp.http.get(rp.authorize_url("page")).send().await?;
    let page_url = first
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("authorize did not redirect to the login page")?;
    let page_url = Arc::new(url::Url::parse(&rp.issuer)?.join(page_url)?);
    let authz = Arc::new(cookies_of(&first).join("; "));
    let page = {
        let (rp, page_url, authz) = (rp.clone(), page_url.clone(), authz.clone());
        phase(
            "login page (first byte)",
            args.page_clients,
            args.seconds,
            args.server_pid,
            move |_, _| {
                let (rp, page_url, authz) = (rp.clone(), page_url.clone(), authz.clone());
                async move {
                    let t0 = Instant::now();
                    let answer = rp
                        .http
                        .get((*page_url).clone())
                        .header(COOKIE, &*authz)
                        .send()
                        .await?
                        .error_for_status()?;
                    // `send` answers once the head arrived: the first byte.
                    let took = t0.elapsed();
                    answer.bytes().await?;
                    Ok(took)
                }
            },
        )
        .await?
    };
    let title = format!(
        "bench oidc on {}: code → token / /healthz = {:.2}, userinfo (hot) / /healthz = {:.2}",
        business.base,
        exchange.per_sec / ceiling.per_sec.max(f64::MIN_POSITIVE),
        userinfo.per_sec / ceiling.per_sec.max(f64::MIN_POSITIVE),
    );
    print(
        &title,
        &[authorize, exchange, userinfo_cold, userinfo, ceiling, page],
        args.json,
    )
}
