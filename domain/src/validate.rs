//! Input rules shared by the aggregates: every way a caller's value can be refused.
//!
//! Owns the limits on names, labels, URLs and numeric settings. Each rule has its own
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_text_counts_characters_not_bytes() {
        assert!(display_text("name", &"é".repeat(100), 100).is_ok());
        assert!(matches!(
            display_text("name", &"é".repeat(101), 100),
            Err(ValidationError::TooLong { actual: 101, .. })
        ));
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
