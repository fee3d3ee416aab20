//! What every IdP handler shares: the business API's state (commands, read models, store,
//! clock), the IdP's settings, its signing keys and caches.

use std::sync::Arc;

use countersign_api::AppState;
use countersign_domain::ServerId;

/// The IdP's settings.
#[derive(Debug, Clone)]
pub struct IdpConfig {
    /// Where browsers and relying parties reach this deployment, without a trailing slash
    /// (`https://login.example.com`); issuers are `{public_url}/oidc/{server_id}`.
    pub public_url: String,
    /// How many browser logins (each opens a session: a write by an anonymous client) a
    /// server takes at once before the rate below applies.
    pub login_burst: u32,
    /// Browser logins per second per server, sustained.
    pub login_per_second: u32,
}

impl IdpConfig {
    /// Settings for `public_url` with default limits.
    pub fn new(public_url: impl Into<String>) -> Self {
        Self {
            public_url: public_url.into().trim_end_matches('/').to_owned(),
            login_burst: 200,
            login_per_second: 50,
        }
    }

    /// Whether cookies must be `Secure` (the deployment is reached over TLS).
    pub fn secure_cookies(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

struct Inner {
    api: AppState,
    config: IdpConfig,
    /// Each server's signing keys and JWKS.
    keys: crate::keys::SigningKeys,
    /// Access tokens recently checked at userinfo (hash → answer, short TTL).
    userinfo: crate::userinfo::UserinfoCache,
    /// Clients recently read (short TTL), for client authentication.
    clients: crate::client_auth::ClientCache,
    /// When each pending CIBA request was last polled (`slow_down`).
    ciba_polls: crate::ciba::PollTimes,
    /// The hosted login page's caches and the browser login limiter.
    browser: crate::login_page::Browser,
    /// How many back-channel messages (logout tokens, CIBA pings) relying parties took.
    delivered: tokio::sync::watch::Sender<u64>,
}

/// Shared by every IdP handler; cheap to clone.
#[derive(Clone)]
pub struct IdpState(Arc<Inner>);

impl std::fmt::Debug for IdpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdpState")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl IdpState {
    pub fn new(api: AppState, config: IdpConfig) -> Self {
        Self(Arc::new(Inner {
            keys: crate::keys::SigningKeys::new(api.clone()),
            userinfo: crate::userinfo::UserinfoCache::default(),
            clients: crate::client_auth::ClientCache::default(),
            api,
            ciba_polls: crate::ciba::PollTimes::default(),
            browser: crate::login_page::Browser::new(&config),
            delivered: tokio::sync::watch::Sender::new(0),
            config,
        }))
    }

    /// How many back-channel messages relying parties have taken so far (what
    /// `countersign_idp_deliveries_total{outcome="delivered"}` counts), to wait on.
    pub fn delivered(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.delivered.subscribe()
    }

    pub(crate) fn count_delivered(&self) {
        self.0.delivered.send_modify(|n| *n += 1);
    }

    /// The business API's state: commands, read models, store, clock.
    pub fn api(&self) -> &AppState {
        &self.0.api
    }

    pub fn config(&self) -> &IdpConfig {
        &self.0.config
    }

    /// The issuer identifier of `server`: `{public_url}/oidc/{server_id}`.
    pub fn issuer(&self, server: ServerId) -> String {
        format!("{}/oidc/{server}", self.0.config.public_url)
    }

    /// Each server's signing keys and JWKS.
    pub fn keys(&self) -> &crate::keys::SigningKeys {
        &self.0.keys
    }

    /// Userinfo answers recently given, by access token hash.
    pub fn userinfo_cache(&self) -> &crate::userinfo::UserinfoCache {
        &self.0.userinfo
    }

    /// OIDC clients recently read.
    pub fn client_cache(&self) -> &crate::client_auth::ClientCache {
        &self.0.clients
    }

    /// When each pending CIBA request was last polled, in this process.
    pub fn ciba_polls(&self) -> &crate::ciba::PollTimes {
        &self.0.ciba_polls
    }

    /// The hosted login page's caches and the per-server browser login limiter.
    pub fn browser(&self) -> &crate::login_page::Browser {
        &self.0.browser
    }

    /// The hosted login page of `server`.
    pub fn login_url(&self, server: ServerId) -> String {
        format!("{}/login/{server}", self.0.config.public_url)
    }
}
