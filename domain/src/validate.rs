//! Input rules shared by the aggregates: every way a caller's value can be refused.
//!
//! Owns the limits on names, labels, texts shown to users, URLs, public keys and numeric
//! settings. Each rule has its own
//! [`ValidationError`] variant naming the field, so the API can say exactly what to fix.
//! Messages never repeat the offending value: it may be personal data or a secret pasted into
//! the wrong field.

use crate::ids::UseridError;

/// A caller's value that breaks a rule (HTTP 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required text is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A text is longer than allowed (in characters or bytes, as the field's doc says).
    #[error("{field} must be at most {max} {unit}, got {actual}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The limit.
        max: usize,
        /// What was given.
        actual: usize,
        /// `characters` or `bytes`.
        unit: &'static str,
    },
    /// A text contains a control character.
    #[error("{field} must not contain control characters")]
    ControlCharacter {
        /// The field.
        field: &'static str,
    },
    /// A text contains a character outside its allowed set.
    #[error("{field} may only contain {allowed}")]
    Charset {
        /// The field.
        field: &'static str,
        /// The allowed characters.
        allowed: &'static str,
    },
    /// A number is outside its range.
    #[error("{field} must be between {min} and {max}, got {actual}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Lowest allowed.
        min: u32,
        /// Highest allowed.
        max: u32,
        /// What was given.
        actual: u32,
    },
    /// The logo URL does not parse as an absolute URL.
    #[error("logo_url is not a valid absolute URL")]
    UrlMalformed,
    /// The logo URL is not `https`: apps must not fetch tenant branding in clear text.
    #[error("logo_url must use https")]
    UrlNotHttps,
    /// The Data Service URL does not parse as an absolute `http` or `https` URL with a host.
    #[error("data_service.url must be an absolute http or https URL")]
    DataServiceUrl,
    /// The default ping time is not below the session timeout, so a continuous session would
    /// time out before its first ping was due.
    #[error("default_ping_time_secs ({ping}) must be less than session_timeout_secs ({timeout})")]
    PingNotBelowTimeout {
        /// The resulting ping time.
        ping: u32,
        /// The resulting session timeout.
        timeout: u32,
    },
    /// The policy allows neither PIN nor biometric, so no account could ever be upgraded.
    #[error("the second-factor policy must allow at least one of pin and biometric")]
    NoSecondFactorAllowed,
    /// The public key is not a valid SEC1-encoded P-256 point.
    #[error("public_key is not a valid P-256 SEC1 point")]
    PublicKey,
    /// A named public key (of several in one command) is not a valid SEC1-encoded P-256 point.
    #[error("{field} is not a valid P-256 SEC1 point")]
    InvalidKey {
        /// The field.
        field: &'static str,
    },
    /// The userid breaks a rule.
    #[error(transparent)]
    Userid(#[from] UseridError),
}

/// Checks a display text: 1..=`max` characters, no control characters.
pub(crate) fn display_text(
    field: &'static str,
    text: &str,
    max: usize,
) -> Result<(), ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    let chars = text.chars().count();
    if chars > max {
        return Err(ValidationError::TooLong {
            field,
            max,
            actual: chars,
            unit: "characters",
        });
    }
    if text.chars().any(char::is_control) {
        return Err(ValidationError::ControlCharacter { field });
    }
    Ok(())
}

/// Checks a one-line text that may be empty: at most `max` characters, no control characters.
pub(crate) fn single_line_text(
    field: &'static str,
    text: &str,
    max: usize,
) -> Result<(), ValidationError> {
    if text.is_empty() {
        return Ok(());
    }
    display_text(field, text, max)
}

/// Checks a number against an inclusive range.
pub(crate) fn in_range(
    field: &'static str,
    actual: u32,
    min: u32,
    max: u32,
) -> Result<u32, ValidationError> {
    if (min..=max).contains(&actual) {
        Ok(actual)
    } else {
        Err(ValidationError::OutOfRange {
            field,
            min,
            max,
            actual,
        })
    }
}

/// Checks a text shown to users that may span lines: at most `max` characters, no control
/// characters except `\n`. Empty is allowed (it shows nothing).
pub(crate) fn multiline_text(
    field: &'static str,
    text: &str,
    max: usize,
) -> Result<(), ValidationError> {
    let chars = text.chars().count();
    if chars > max {
        return Err(ValidationError::TooLong {
            field,
            max,
            actual: chars,
            unit: "characters",
        });
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ValidationError::ControlCharacter { field });
    }
    Ok(())
}

/// A P-256 public key as events store it: the uncompressed SEC1 point (65 bytes) and its
/// SHA-256 thumbprint. `None` when `sec1` (compressed or uncompressed) is not a point on the
/// curve; the caller names the field in its error.
pub fn p256_public_key(sec1: &[u8]) -> Option<(Vec<u8>, [u8; 32])> {
    use p256::elliptic_curve::sec1::ToSec1Point;
    use sha2::{Digest, Sha256};

    let key = p256::PublicKey::from_sec1_bytes(sec1).ok()?;
    let uncompressed = key.as_affine().to_sec1_point(false).as_bytes().to_vec();
    let thumbprint: [u8; 32] = Sha256::digest(&uncompressed).into();
    Some((uncompressed, thumbprint))
}

/// Longest accepted logo URL, in bytes.
pub const LOGO_URL_MAX_BYTES: usize = 2048;

/// Checks a logo URL: absolute `https`, at most [`LOGO_URL_MAX_BYTES`].
pub(crate) fn logo_url(text: &str) -> Result<(), ValidationError> {
    if text.len() > LOGO_URL_MAX_BYTES {
        return Err(ValidationError::TooLong {
            field: "logo_url",
            max: LOGO_URL_MAX_BYTES,
            actual: text.len(),
            unit: "bytes",
        });
    }
    let url = url::Url::parse(text).map_err(|_| ValidationError::UrlMalformed)?;
    if url.scheme() != "https" || url.host().is_none() {
        return Err(ValidationError::UrlNotHttps);
    }
    Ok(())
}

/// Longest accepted Data Service URL, in bytes.
pub const DATA_SERVICE_URL_MAX_BYTES: usize = 2048;

/// Checks a Data Service URL: absolute `http` or `https` with a host, at most
/// [`DATA_SERVICE_URL_MAX_BYTES`]. Plain `http` is allowed: a DS often sits next to the NS on
/// a private network, and every request is signed, so a DS can tell ours from a forgery.
pub(crate) fn data_service_url(text: &str) -> Result<(), ValidationError> {
    if text.len() > DATA_SERVICE_URL_MAX_BYTES {
        return Err(ValidationError::TooLong {
            field: "data_service.url",
            max: DATA_SERVICE_URL_MAX_BYTES,
            actual: text.len(),
            unit: "bytes",
        });
    }
    let url = url::Url::parse(text).map_err(|_| ValidationError::DataServiceUrl)?;
    // Credentials in the URL would land in the event log; a fragment is never sent.
    let plain = url.username().is_empty() && url.password().is_none() && url.fragment().is_none();
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || !plain {
        return Err(ValidationError::DataServiceUrl);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_service_url_rules() {
        assert!(data_service_url("https://ds.example/v1/in").is_ok());
        assert!(data_service_url("http://127.0.0.1:8081/").is_ok());
        for bad in [
            "ftp://ds.example/",
            "not a url",
            "/relative",
            "https://user:pw@ds.example/",
            "https://ds.example/#frag",
            "data:text/plain,x",
        ] {
            assert_eq!(
                data_service_url(bad),
                Err(ValidationError::DataServiceUrl),
                "{bad}"
            );
        }
        let long = format!("https://ds.example/{}", "a".repeat(2048));
        assert!(matches!(
            data_service_url(&long),
            Err(ValidationError::TooLong {
                field: "data_service.url",
                ..
            })
        ));
    }

    #[test]
    fn display_text_counts_characters_not_bytes() {
        assert!(display_text("name", &"é".repeat(100), 100).is_ok());
        assert!(matches!(
            display_text("name", &"é".repeat(101), 100),
            Err(ValidationError::TooLong { actual: 101, .. })
        ));
    }

    #[test]
    fn multiline_text_allows_newlines_only() {
        assert!(multiline_text("info", "", 10).is_ok());
        assert!(multiline_text("info", "line 1\nline 2", 20).is_ok());
        assert!(multiline_text("info", &"é".repeat(10), 10).is_ok());
        assert!(matches!(
            multiline_text("info", &"é".repeat(11), 10),
            Err(ValidationError::TooLong { actual: 11, .. })
        ));
        for bad in ["a\rb", "a\tb", "\u{1b}[31m", "a\u{85}b"] {
            assert_eq!(
                multiline_text("info", bad, 10),
                Err(ValidationError::ControlCharacter { field: "info" })
            );
        }
    }

    #[test]
    fn p256_keys_normalise_to_uncompressed() {
        use p256::elliptic_curve::sec1::ToSec1Point;
        let public = p256::SecretKey::from_slice(&[0x42; 32])
            .unwrap()
            .public_key();
        let uncompressed = public.as_affine().to_sec1_point(false).as_bytes().to_vec();
        let compressed = public.as_affine().to_sec1_point(true).as_bytes().to_vec();
        let (a, ta) = p256_public_key(&uncompressed).unwrap();
        let (b, tb) = p256_public_key(&compressed).unwrap();
        assert_eq!((a.len(), &a), (65, &uncompressed));
        assert_eq!((b, tb), (uncompressed.clone(), ta));
        // The server test vector's thumbprint (see server_lifecycle.snap).
        assert_eq!(
            hex::encode(ta),
            "8964233423574cbc50a15c713208ecb85f8c6a62e319bba9680978380dd67859"
        );
        assert!(p256_public_key(&[]).is_none());
        assert!(p256_public_key(&[0x04; 65]).is_none());
        assert!(p256_public_key(&uncompressed[..64]).is_none());
    }

    #[test]
    fn logo_url_rules() {
        assert!(logo_url("https://example.com/logo.png").is_ok());
        assert_eq!(
            logo_url("http://example.com/logo.png"),
            Err(ValidationError::UrlNotHttps)
        );
        assert_eq!(
            logo_url("data:image/png;base64,AAAA"),
            Err(ValidationError::UrlNotHttps)
        );
        assert_eq!(logo_url("not a url"), Err(ValidationError::UrlMalformed));
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(matches!(
            logo_url(&long),
            Err(ValidationError::TooLong {
                field: "logo_url",
                ..
            })
        ));
    }
}
