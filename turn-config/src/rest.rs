//! TURN REST API credentials ("A REST API for access to TURN services",
//! draft-uberti-behave-turn-rest-00), exactly as coturn's `use-auth-secret`
//! and Synapse's `turn_shared_secret` implement it:
//!
//! ```text
//! username = "{expiry_unix_seconds}:{user_id}"
//! password = base64(HMAC-SHA1(key = shared_secret, msg = username))
//! ```
//!
//! A TURN server then uses the usual long-term credential mechanism
//! (RFC 8489 §9.2): the message-integrity key is `MD5(username:realm:password)`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use std::fmt;

/// The shared secret between the credential issuer and the TURN server.
///
/// It never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret(String);

impl SharedSecret {
    /// Wraps a secret; an empty secret is allowed by the type but rejected by config validation.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for writing it to the data directory or a TURN server's config.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `base64(HMAC-SHA1(secret, username))`: the password for a REST username.
    pub fn password_for(&self, username: &str) -> String {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(self.0.as_bytes()).expect("HMAC-SHA1 takes keys of any length");
        mac.update(username.as_bytes());
        STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Mints credentials for `user_id` valid until `now_unix + ttl_secs`.
    pub fn mint(&self, user_id: &str, now_unix: u64, ttl_secs: u64) -> Credentials {
        let username = format!("{}:{}", now_unix.saturating_add(ttl_secs), user_id);
        let password = self.password_for(&username);
        Credentials { username, password }
    }

    /// What a TURN server does with a REST username: checks that it has not
    /// expired and returns the password it must have been minted with.
    ///
    /// The expiry is the leading run of digits before the first `:`; a username
    /// with no `:` is a bare timestamp (coturn accepts both).
    pub fn password_if_valid(&self, username: &str, now_unix: u64) -> Result<String, CredentialError> {
        let expiry_text = username.split(':').next().unwrap_or(username);
        if expiry_text.is_empty() || !expiry_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CredentialError::Malformed);
        }
        let expiry: u64 = expiry_text.parse().map_err(|_| CredentialError::Malformed)?;
        if expiry < now_unix {
            return Err(CredentialError::Expired { expiry });
        }
        Ok(self.password_for(username))
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(***)")
    }
}

/// A REST username/password pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Why a REST username is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the username does not start with an expiry timestamp")]
    Malformed,
    #[error("the username expired at {expiry}")]
    Expired { expiry: u64 },
}

/// The long-term credential key (RFC 8489 §9.2.2): `MD5(username ":" realm ":" password)`.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(username.as_bytes());
    md5.update(b":");
    md5.update(realm.as_bytes());
    md5.update(b":");
    md5.update(password.as_bytes());
    md5.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of `matrix-voip.md` §4, cross-checked with Python's
    /// `hmac` module and `openssl dgst -sha1 -hmac`.
    #[test]
    fn worked_example() {
        let secret = SharedSecret::new("n0t-a-real-secret");
        let creds = secret.mint("@alice:example.org", 1_767_225_600 - 3600, 3600);
        assert_eq!(creds.username, "1767225600:@alice:example.org");
        assert_eq!(creds.password, "4o55QwkjcgWpGagYHUvzxll68IA=");
        let key = long_term_key(&creds.username, "example.org", &creds.password);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ef173ec07358b23a590d6cc92f2fa894");
    }

    #[test]
    fn relay_side_check() {
        let secret = SharedSecret::new("s3cret");
        let creds = secret.mint("@bob:hs", 1000, 60);
        assert_eq!(
            secret.password_if_valid(&creds.username, 1000),
            Ok(creds.password.clone())
        );
        assert_eq!(secret.password_if_valid(&creds.username, 1060), Ok(creds.password));
        assert_eq!(
            secret.password_if_valid(&creds.username, 1061),
            Err(CredentialError::Expired { expiry: 1060 })
        );
        assert_eq!(secret.password_if_valid("bob", 0), Err(CredentialError::Malformed));
        assert_eq!(secret.password_if_valid(":bob", 0), Err(CredentialError::Malformed));
        // A bare timestamp is a valid username too (coturn accepts it).
        assert!(secret.password_if_valid("5000", 10).is_ok());
        // A different secret yields a different password.
        let other = SharedSecret::new("other");
        assert_ne!(other.password_for("1060:@bob:hs"), secret.password_for("1060:@bob:hs"));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let secret = SharedSecret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        let creds = secret.mint("@a:b", 0, 1);
        assert!(!format!("{creds:?}").contains(&creds.password));
    }
}
