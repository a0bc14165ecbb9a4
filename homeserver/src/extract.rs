//! Request extractors: every piece of a request becomes a typed value here, and
//! every way it can be wrong becomes a Matrix error.

use crate::error::MatrixError;
use crate::store::Session;
use crate::{Homeserver, Stats};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// A JSON body: unparseable → `M_NOT_JSON`, wrong shape → `M_BAD_JSON`,
/// over the body limit → `M_TOO_LARGE`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = MatrixError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                MatrixError::too_large("Request body too large")
            } else {
                MatrixError::not_json(format!("Could not read the body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON document into `T`, telling syntax errors (`M_NOT_JSON`) from shape errors (`M_BAD_JSON`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MatrixError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        bytes
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MatrixError::not_json(format!("Content not JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| MatrixError::bad_json(format!("Invalid JSON: {e}")))
}

/// Query parameters; a malformed query is `M_INVALID_PARAM`.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| MatrixError::invalid_param(e.body_text()))
    }
}

/// Path parameters; a malformed path is `M_INVALID_PARAM`.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|e| MatrixError::invalid_param(e.body_text()))
    }
}

/// The authenticated caller: the session its access token stands for.
#[derive(Debug, Clone)]
pub struct Auth {
    pub session: Session,
    pub token_hash: Vec<u8>,
}

impl Auth {
    pub fn user_id(&self) -> &str {
        &self.session.user_id
    }
}

/// SHA-256 of an access token: only this is stored.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn access_token(parts: &Parts) -> Option<String> {
    if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = header.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string());
    }
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "access_token").then(|| urlencoding_decode(value))
    })
}

fn urlencoding_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromRequestParts<Arc<Homeserver>> for Auth {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, hs: &Arc<Homeserver>) -> Result<Self, Self::Rejection> {
        let token = access_token(parts)
            .ok_or_else(|| MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token"))?;
        let hash = token_hash(&token);
        let lookup = hash.clone();
        let session = hs.with_store(move |store| Ok(store.session(&lookup)?)).await?;
        match session {
            Some(session) => Ok(Auth {
                session,
                token_hash: hash,
            }),
            None => Err(MatrixError::new(
                StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "Unrecognised access token",
            )),
        }
    }
}

/// The client's IP address (for rate limiting).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Ok(ClientAddr(addr))
    }
}

/// Applies the register/login rate limit for a client address.
pub fn check_login_rate(hs: &Homeserver, ClientAddr(addr): ClientAddr) -> Result<(), MatrixError> {
    hs.login_limiter
        .check(addr, std::time::Instant::now())
        .map_err(|retry_after_ms| {
            Stats::inc(&hs.stats.rate_limited);
            MatrixError::limit_exceeded(retry_after_ms)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors() {
        #[derive(serde::Deserialize, Debug)]
        struct Body {
            #[allow(dead_code)]
            a: u32,
        }
        assert_eq!(parse_json::<Body>(b"{nope").unwrap_err().errcode, "M_NOT_JSON");
        assert_eq!(parse_json::<Body>(br#"{"a":"x"}"#).unwrap_err().errcode, "M_BAD_JSON");
        assert!(parse_json::<Body>(br#"{"a":1}"#).is_ok());
    }

    #[test]
    fn query_decoding() {
        assert_eq!(urlencoding_decode("a%2Bb+c%"), "a+b c%");
        assert_eq!(urlencoding_decode("%zz"), "%zz");
    }
}
