//! The keys each issuer signs with, and its JWKS.
//!
//! A server's first OIDC signing key is the server's own P-256 key (vault
//! `server/{id}/signing-key`); `POST /v1/servers/{id}/oidc/keys` rotates to a fresh one (vault
//! `server/{id}/oidc-key/{kid}`, event `server.oidc_key_rotated`, read model `rm_oidc_keys`).
//! Rules:
//! - the newest key signs; `kid` is its RFC 7638 JWK thumbprint;
//! - the JWKS lists the current key and every key that was current within the last
//!   [`RETIRED_KEY_SECS`] (the longest token lifetime, an ID token's 600 s, plus a logout
//!   token's 120 s), so a token signed just before a rotation verifies until it expires;
//! - `id_token_hint` verification accepts any key the server ever signed with (the hint's
//!   expiry is ignored by design);
//! - a deleted server has no key (the vault entry is destroyed): [`KeyError::NotFound`].
//!
//! The key set is cached per server for [`KEY_SET_TTL`] (a rotation is seen within it, and by
//! a JWKS read with the rotation's `min_position` at once); which retired keys the JWKS still
//! lists is decided when it is asked, by the clock; private keys are
//! cached by kid for good (a key never changes under its kid). Private keys never leave this
//! module but inside a [`Signer`], whose `Debug` prints the kid only.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_api::AppState;
use countersign_domain::ServerId;
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use sha2::{Digest, Sha256};

/// How long a key retired by a rotation stays in the JWKS, seconds.
pub const RETIRED_KEY_SECS: i64 = 600 + 120;
/// How long a server's key set is reused before the read model is asked again.
pub const KEY_SET_TTL: Duration = Duration::from_secs(1);

/// Why no key could be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The server does not exist (or was deleted): 404.
    #[error("no such server")]
    NotFound,
    /// The vault or the read model failed, or a stored key is not P-256: 500.
    #[error("signing keys unavailable: {0}")]
    Unavailable(String),
}

/// A private key and its `kid`. `Debug` prints the kid only.
///
/// Signing goes through `ring` (already in the tree for TLS), whose P-256 is faster than
/// RustCrypto's; an ID token is signed on every code exchange. The signature is the same JWS
/// ES256 form (`r ‖ s`, 64 bytes, low-s) either way; the `p256` key stays for the public half
/// and as the fallback should `ring` refuse the key.
#[derive(Clone)]
pub struct Signer {
    /// RFC 7638 thumbprint of the public key.
    pub kid: String,
    key: SigningKey,
    ring: Option<Arc<ring::signature::EcdsaKeyPair>>,
}

impl Signer {
    /// Wraps a key (tests and the key set).
    pub fn new(key: SigningKey) -> Self {
        let public = key.verifying_key().as_affine().to_sec1_point(false);
        let ring = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            key.to_bytes().as_slice(),
            public.as_bytes(),
            &ring::rand::SystemRandom::new(),
        )
        .ok()
        .map(Arc::new);
        Self {
            kid: thumbprint(key.verifying_key()),
            key,
            ring,
        }
    }

    /// The ES256 signature of `message`: `r ‖ s`, 64 bytes.
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        // Low-s, as the p256 path gives: one encoding for every signature (strict verifiers
        // refuse the other).
        if let Some(ring) = &self.ring
            && let Ok(signature) = ring.sign(&ring::rand::SystemRandom::new(), message)
            && let Ok(signature) = p256::ecdsa::Signature::from_slice(signature.as_ref())
        {
            return signature.normalize_s().to_bytes().to_vec();
        }
        countersign_protocol::cose::sign_es256(&self.key, message).to_vec()
    }

    /// The public half.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.key.verifying_key()
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The JWK members of a P-256 public key: `x` and `y`, base64url.
fn coordinates(key: &VerifyingKey) -> (String, String) {
    let point = key.as_affine().to_sec1_point(false);
    let bytes = point.as_bytes();
    // Uncompressed SEC1: 0x04 ‖ x (32) ‖ y (32).
    let x = bytes.get(1..33).unwrap_or_default();
    let y = bytes.get(33..65).unwrap_or_default();
    (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y))
}

/// RFC 7638 JWK thumbprint: base64url(SHA-256(`{"crv":"P-256","kty":"EC","x":…,"y":…}`)).
pub fn thumbprint(key: &VerifyingKey) -> String {
    let (x, y) = coordinates(key);
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The public JWK of a key.
pub fn jwk(kid: &str, key: &VerifyingKey) -> serde_json::Value {
    let (x, y) = coordinates(key);
    serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": x,
        "y": y,
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
    })
}

struct KeySet {
    fetched: Instant,
    /// The read models had processed every event before this position when the set was read.
    position: u64,
    signer: Signer,
    /// Every key the server ever signed with, oldest first.
    all: Vec<(String, VerifyingKey)>,
    /// `(kid, key, when it stopped signing, ms)` for every key but the current one, oldest
    /// first: the JWKS lists those retired within [`RETIRED_KEY_SECS`] of the time it is asked.
    retired: Vec<(String, VerifyingKey, i64)>,
}

/// Each server's signing keys (in [`crate::IdpState`]).
pub struct SigningKeys {
    api: AppState,
    sets: RwLock<HashMap<ServerId, Arc<KeySet>>>,
    private: RwLock<HashMap<(ServerId, String), Signer>>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys").finish_non_exhaustive()
    }
}

impl SigningKeys {
    /// Keys read through the business API's commands (vault) and read models.
    pub fn new(api: AppState) -> Self {
        Self {
            api,
            sets: RwLock::default(),
            private: RwLock::default(),
        }
    }

    /// The key that signs for `server` now.
    ///
    /// # Errors
    /// [`KeyError::NotFound`] for a server that does not exist.
    pub async fn signer(&self, server: ServerId) -> Result<Signer, KeyError> {
        Ok(self.set(server).await?.signer.clone())
    }

    /// The server's JWKS document (`{"keys": [...]}`).
    ///
    /// # Errors
    /// As [`Self::signer`].
    pub async fn jwks(&self, server: ServerId) -> Result<serde_json::Value, KeyError> {
        self.jwks_after(server, None).await
    }

    /// The JWKS as of at least log position `seen` (a rotation the caller just made, whose
    /// answer carried that position): a cached set read before it is read again. The caller
    /// has waited for the read models to reach `seen`.
    ///
    /// # Errors
    /// As [`Self::signer`].
    pub async fn jwks_after(
        &self,
        server: ServerId,
        seen: Option<u64>,
    ) -> Result<serde_json::Value, KeyError> {
        let set = match seen {
            Some(seen) => self.set_after(server, seen).await?,
            None => self.set(server).await?,
        };
        let now = self.api.clock().now().as_millis();
        let mut keys = vec![jwk(&set.signer.kid, set.signer.verifying_key())];
        for (kid, key, until) in set.retired.iter().rev() {
            if now - until < RETIRED_KEY_SECS * 1000 && *kid != set.signer.kid {
                keys.push(jwk(kid, key));
            }
        }
        Ok(serde_json::json!({ "keys": keys }))
    }

    /// Every public key the server ever signed with, `(kid, key)`, oldest first.
    ///
    /// # Errors
    /// As [`Self::signer`].
    pub async fn verifying_keys(
        &self,
        server: ServerId,
    ) -> Result<Vec<(String, VerifyingKey)>, KeyError> {
        Ok(self.set(server).await?.all.clone())
    }

    async fn set(&self, server: ServerId) -> Result<Arc<KeySet>, KeyError> {
        if let Some(set) = self
            .sets
            .read()
            .ok()
            .and_then(|sets| sets.get(&server).cloned())
            && set.fetched.elapsed() < KEY_SET_TTL
        {
            return Ok(set);
        }
        self.rebuild(server).await
    }

    /// The set, read again unless the cached one already covers log position `seen`.
    async fn set_after(&self, server: ServerId, seen: u64) -> Result<Arc<KeySet>, KeyError> {
        if let Some(set) = self
            .sets
            .read()
            .ok()
            .and_then(|sets| sets.get(&server).cloned())
            && set.position > seen
            && set.fetched.elapsed() < KEY_SET_TTL
        {
            return Ok(set);
        }
        self.rebuild(server).await
    }

    async fn rebuild(&self, server: ServerId) -> Result<Arc<KeySet>, KeyError> {
        let set = Arc::new(self.build(server).await?);
        if let Ok(mut sets) = self.sets.write() {
            if sets.len() > 10_000 {
                sets.retain(|_, s| s.fetched.elapsed() < KEY_SET_TTL);
            }
            sets.insert(server, Arc::clone(&set));
        }
        Ok(set)
    }

    /// A private key by kid (`None`: the server's own key), from the cache or the vault.
    async fn private(&self, server: ServerId, kid: Option<&str>) -> Result<Signer, KeyError> {
        // The server's own key (no kid) is read again with each key set, about once a second:
        // that read is what finds a deleted server (its vault entry destroyed), so its
        // rotated keys, cached here for good, stop signing with it.
        if let Some(kid) = kid
            && let Some(signer) = self
                .private
                .read()
                .ok()
                .and_then(|p| p.get(&(server, kid.to_owned())).cloned())
        {
            return Ok(signer);
        }
        let bytes = self
            .api
            .commands()
            .grants
            .signing_key(server, kid)
            .await
            .map_err(|e| KeyError::Unavailable(e.to_string()))?
            .ok_or(KeyError::NotFound)?;
        let key = SigningKey::from_slice(&bytes)
            .map_err(|_| KeyError::Unavailable("a stored signing key is not P-256".into()))?;
        let signer = Signer::new(key);
        if kid.is_some_and(|kid| kid != signer.kid) {
            return Err(KeyError::Unavailable(
                "a stored OIDC key does not match its kid".into(),
            ));
        }
        if let Ok(mut private) = self.private.write() {
            private.insert((server, signer.kid.clone()), signer.clone());
        }
        Ok(signer)
    }

    async fn build(&self, server: ServerId) -> Result<KeySet, KeyError> {
        let position = *self.api.reads().processed().borrow();
        // The server's own key is first: it exists as long as the server does.
        let first = self.private(server, None).await?;
        let rotated = self
            .api
            .reads()
            .oidc_keys(server)
            .await
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let mut all = vec![(first.kid.clone(), *first.verifying_key())];
        // (kid, key, when it stopped signing) for every key but the current one.
        let mut retired: Vec<(String, VerifyingKey, i64)> = Vec::new();
        for row in &rotated {
            let key = VerifyingKey::from_sec1_bytes(&row.public_key)
                .map_err(|_| KeyError::Unavailable("a stored OIDC key is not P-256".into()))?;
            if let Some((kid, previous)) = all.last() {
                retired.push((kid.clone(), *previous, row.rotated_at.as_millis()));
            }
            all.push((row.kid.clone(), key));
        }
        let signer = match rotated.last() {
            Some(row) => self.private(server, Some(&row.kid)).await?,
            None => first,
        };
        Ok(KeySet {
            fetched: Instant::now(),
            position,
            signer,
            all,
            retired,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example key is RSA; this checks the EC form against a thumbprint
    /// computed by hand from the canonical JSON.
    #[test]
    fn thumbprint_is_of_the_canonical_jwk() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let (x, y) = coordinates(key.verifying_key());
        assert_eq!(x.len(), 43);
        let json = format!("{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{x}\",\"y\":\"{y}\"}}");
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes()));
        assert_eq!(thumbprint(key.verifying_key()), expected);
        let signer = Signer::new(key);
        assert_eq!(signer.kid, expected);
        assert!(!format!("{signer:?}").contains("key:"));
    }
}
