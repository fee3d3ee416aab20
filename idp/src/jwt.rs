//! ES256 JWS compact serialization (RFC 7515, RFC 7518 §3.4) for ID tokens and logout tokens,
//! built from `p256` (RFC 6979 deterministic ECDSA), base64url and serde_json, no JWT crate.
//!
//! Rules: the header is `{"alg":"ES256","kid":…,"typ":…}`; the signature is the 64-byte
//! `r ‖ s` form. [`verify`] accepts only `alg` ES256 (never `none`, never an algorithm the
//! token names for itself), a `kid` among the given keys, and a payload that is a JSON
//! object; it checks no claim: the caller knows which `iss`, `aud` and `exp` it expects.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::ServerId;
use p256::ecdsa::VerifyingKey;

use crate::keys::Signer;
use crate::state::IdpState;

/// Longest token [`verify`] reads.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token could not be signed or verified. Never echoes the token.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The claims could not be encoded (not expected).
    #[error("claims do not encode: {0}")]
    Encode(String),
    /// Not three base64url parts of JSON, or too long.
    #[error("not a compact JWS")]
    Malformed,
    /// Another algorithm than ES256.
    #[error("unsupported algorithm")]
    Algorithm,
    /// The `kid` names none of the keys.
    #[error("unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The issuer's keys could not be had.
    #[error("keys unavailable: {0}")]
    Keys(#[from] crate::keys::KeyError),
    /// The token was verified but names another issuer.
    #[error("another issuer")]
    WrongIssuer,
}

/// Signs `claims` with `typ: JWT`.
///
/// # Errors
/// [`JwtError::Encode`] if the claims do not serialize.
pub fn sign(signer: &Signer, claims: &serde_json::Value) -> Result<String, JwtError> {
    sign_typed(signer, "JWT", claims)
}

/// Signs `claims` with the given `typ` (`logout+jwt` for logout tokens).
///
/// # Errors
/// [`JwtError::Encode`] if the claims do not serialize.
pub fn sign_typed(
    signer: &Signer,
    typ: &str,
    claims: &serde_json::Value,
) -> Result<String, JwtError> {
    let header = serde_json::json!({ "alg": "ES256", "kid": signer.kid, "typ": typ });
    let header = serde_json::to_vec(&header).map_err(|e| JwtError::Encode(e.to_string()))?;
    let payload = serde_json::to_vec(claims).map_err(|e| JwtError::Encode(e.to_string()))?;
    let mut token = String::with_capacity(64 + payload.len() * 4 / 3 + 90);
    URL_SAFE_NO_PAD.encode_string(&header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let signature = signer.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

/// Verifies a compact ES256 JWS under one of `keys` (`(kid, key)`) and returns its claims.
///
/// # Errors
/// The [`JwtError`] of the first check that failed.
pub fn verify(keys: &[(String, VerifyingKey)], token: &str) -> Result<serde_json::Value, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    if header.get("alg").and_then(|v| v.as_str()) != Some("ES256") {
        return Err(JwtError::Algorithm);
    }
    if header.get("crit").is_some() {
        return Err(JwtError::Algorithm);
    }
    let kid = header.get("kid").and_then(|v| v.as_str());
    let key = match kid {
        Some(kid) => keys.iter().find(|(k, _)| k == kid).map(|(_, key)| key),
        // Without a kid, only a single key can be meant.
        None if keys.len() == 1 => keys.first().map(|(_, key)| key),
        None => None,
    }
    .ok_or(JwtError::UnknownKey)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::Malformed)?;
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let signed = token.get(..signed_len).ok_or(JwtError::Malformed)?;
    countersign_protocol::cose::verify_es256(key, signed.as_bytes(), &signature)
        .map_err(|_| JwtError::BadSignature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
    if !claims.is_object() {
        return Err(JwtError::Malformed);
    }
    Ok(claims)
}

/// Verifies a token as one `server`'s issuer signed (any key it ever signed with) and checks
/// its `iss`; no other claim (an `id_token_hint` may have expired).
///
/// # Errors
/// As [`verify`], [`JwtError::Keys`] for a server without keys, [`JwtError::WrongIssuer`].
pub async fn verify_for(
    state: &IdpState,
    server: ServerId,
    token: &str,
) -> Result<serde_json::Value, JwtError> {
    let keys = state.keys().verifying_keys(server).await?;
    let claims = verify(&keys, token)?;
    if claims.get("iss").and_then(|v| v.as_str()) != Some(state.issuer(server).as_str()) {
        return Err(JwtError::WrongIssuer);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::SigningKey;

    use super::*;

    fn signer(byte: u8) -> Signer {
        Signer::new(SigningKey::from_slice(&[byte; 32]).unwrap())
    }

    #[test]
    fn signs_and_verifies() {
        let s = signer(3);
        let claims = serde_json::json!({"iss": "x", "n": 1});
        let token = sign(&s, &claims).unwrap();
        let keys = vec![(s.kid.clone(), *s.verifying_key())];
        assert_eq!(verify(&keys, &token).unwrap(), claims);
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], s.kid.as_str());
        assert_eq!(header["typ"], "JWT");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(token.rsplit('.').next().unwrap())
                .unwrap()
                .len(),
            64
        );
    }

    #[test]
    fn refuses_other_keys_algorithms_and_tampering() {
        let s = signer(3);
        let other = signer(4);
        let token = sign(&s, &serde_json::json!({"sub": "a"})).unwrap();
        let keys = vec![(s.kid.clone(), *s.verifying_key())];
        // Another key under the same kid.
        let wrong = vec![(s.kid.clone(), *other.verifying_key())];
        assert!(matches!(
            verify(&wrong, &token),
            Err(JwtError::BadSignature)
        ));
        // Unknown kid.
        let unknown = vec![(other.kid.clone(), *other.verifying_key())];
        assert!(matches!(
            verify(&unknown, &token),
            Err(JwtError::UnknownKey)
        ));
        // A changed payload.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"b"}"#);
        parts[1] = &forged;
        assert!(matches!(
            verify(&keys, &parts.join(".")),
            Err(JwtError::BadSignature)
        ));
        // alg none.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"a"}"#)
        );
        assert!(matches!(verify(&keys, &none), Err(JwtError::Algorithm)));
        assert!(matches!(verify(&keys, "a.b"), Err(JwtError::Malformed)));
        assert!(matches!(verify(&keys, "a.b.c.d"), Err(JwtError::Malformed)));
    }
}
