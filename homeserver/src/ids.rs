//! Matrix identifiers (<https://spec.matrix.org/v1.13/appendices/#identifier-grammar>):
//! validation at the edge and generation of new ones.

use crate::error::MatrixError;
use base64::Engine as _;

/// Longest user, room or event id the spec allows.
pub const MAX_ID_LEN: usize = 255;

/// Fills a buffer from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG failing means the machine is unusable for anything secure.
    getrandom::fill(&mut buf).expect("the operating system's random number generator works");
    buf
}

/// A random string over `alphabet`, `len` characters long (unbiased by rejection).
pub fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut out = String::with_capacity(len);
    let limit = 256 - (256 % alphabet.len());
    while out.len() < len {
        for b in random_bytes::<64>() {
            if (b as usize) < limit && out.len() < len {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

pub fn new_room_id(server_name: &str) -> String {
    format!("!{}:{server_name}", random_string(ALNUM, 18))
}

/// Event ids look like those of room versions 4+: `$` and 43 url-safe base64 characters.
pub fn new_event_id() -> String {
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    format!("${hash}")
}

pub fn new_device_id() -> String {
    random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 10)
}

/// Access tokens carry 256 bits of randomness; only their SHA-256 is stored.
pub fn new_access_token() -> String {
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    format!("sbt_{body}")
}

/// Checks a localpart for registration: the historical-free grammar
/// `[a-z0-9._=/+-]`, not starting with `_` (reserved for bridges and bots).
pub fn validate_new_localpart(localpart: &str, server_name: &str) -> Result<(), MatrixError> {
    let invalid = |why: &str| {
        MatrixError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_INVALID_USERNAME",
            why.to_string(),
        )
    };
    if localpart.is_empty() {
        return Err(invalid("The username must not be empty"));
    }
    if !localpart
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(invalid("Usernames may only contain a-z, 0-9, and . _ = - / +"));
    }
    if localpart.starts_with('_') {
        return Err(invalid("Usernames may not start with '_'"));
    }
    if localpart.len() + server_name.len() + 2 > MAX_ID_LEN {
        return Err(invalid("The user id would be longer than 255 characters"));
    }
    Ok(())
}

/// A syntactically valid id with the given sigil (`@`, `!`, `$`): `sigil localpart ":" server`.
pub fn is_valid_id(id: &str, sigil: char) -> bool {
    id.len() <= MAX_ID_LEN
        && id.starts_with(sigil)
        && match id[1..].split_once(':') {
            Some((local, server)) => !local.is_empty() && !server.is_empty(),
            None => false,
        }
        && !id.chars().any(char::is_control)
}

/// The server part of a `@user:server` or `!room:server` id.
pub fn server_of(id: &str) -> Option<&str> {
    id.split_once(':').map(|(_, server)| server)
}

/// Accepts `alice` or `@alice:server` for a local user and returns the full user id.
pub fn local_user_id(user: &str, server_name: &str) -> Option<String> {
    if user.starts_with('@') {
        (is_valid_id(user, '@') && server_of(user) == Some(server_name)).then(|| user.to_string())
    } else if !user.is_empty() && !user.contains(':') {
        Some(format!("@{}:{server_name}", user.to_lowercase()))
    } else {
        None
    }
}

/// Transaction ids, filter ids and similar opaque path parameters.
pub fn is_valid_opaque_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localparts() {
        assert!(validate_new_localpart("alice", "hs").is_ok());
        assert!(validate_new_localpart("a.b_c=d-e/f+g9", "hs").is_ok());
        assert!(validate_new_localpart("Alice", "hs").is_err());
        assert!(validate_new_localpart("_bot", "hs").is_err());
        assert!(validate_new_localpart("al ice", "hs").is_err());
        assert!(validate_new_localpart("", "hs").is_err());
        assert!(validate_new_localpart(&"a".repeat(300), "hs").is_err());
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("@a:b", '@'));
        assert!(!is_valid_id("@a", '@'));
        assert!(!is_valid_id("a:b", '@'));
        assert!(!is_valid_id("@:b", '@'));
        assert_eq!(local_user_id("Bob", "hs").as_deref(), Some("@bob:hs"));
        assert_eq!(local_user_id("@bob:hs", "hs").as_deref(), Some("@bob:hs"));
        assert_eq!(local_user_id("@bob:other", "hs"), None);
        let room = new_room_id("hs");
        assert!(is_valid_id(&room, '!'));
        assert_eq!(new_event_id().len(), 44);
        assert_ne!(new_access_token(), new_access_token());
    }
}
