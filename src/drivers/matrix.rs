//! A Matrix Client-Server API client for the conference bot: login, the
//! `/sync` long-poll loop and idempotent sends. It speaks plain HTTP to any
//! homeserver (ours in all-in-one mode, Synapse or tuwunel otherwise).

use anyhow::{Context, Result, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

/// Requests are tried at most this many times (see [`MatrixClient::request`]).
const SEND_ATTEMPTS: u32 = 5;

/// The longest a request waits between its attempts in all: the bot acts on
/// one thing at a time, so a homeserver asking for minutes (a `429`'s
/// `retry_after_ms`) must not hold every other call that long.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: String,
    token: String,
    pub user_id: String,
    pub device_id: String,
}

/// What one `/sync` response holds for the bot.
#[derive(Debug, Default)]
pub struct SyncBatch {
    pub next_batch: String,
    /// Rooms we are invited to, with who invited us.
    pub invites: Vec<(String, Option<String>)>,
    /// State (before the timeline) and timeline events of joined rooms, in order: (room, event).
    pub timeline: Vec<(String, Value)>,
    /// Rooms we left or were removed from.
    pub left: Vec<String>,
}

impl MatrixClient {
    /// Logs in with a password, registering the user first if the server lets
    /// anyone register (all-in-one mode) and the user does not exist yet.
    pub async fn login_or_register(base: &str, localpart: &str, password: &str, device_id: &str) -> Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(90)).build()?;
        let base = base.trim_end_matches('/').to_string();
        let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
            "password": password, "device_id": device_id, "initial_device_display_name": "Switchboard conference bot"});
        let mut response = http
            .post(format!("{base}/_matrix/client/v3/login"))
            .json(&login)
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::FORBIDDEN {
            let register = json!({"username": localpart, "password": password, "device_id": device_id,
                "initial_device_display_name": "Switchboard conference bot", "auth": {"type": "m.login.dummy"}});
            response = http
                .post(format!("{base}/_matrix/client/v3/register"))
                .json(&register)
                .send()
                .await?;
        }
        let status = response.status();
        let body: Value = response.json().await.context("login answer")?;
        if !status.is_success() {
            bail!(
                "logging in as {localpart} failed: {status} {}",
                body["errcode"].as_str().unwrap_or("")
            );
        }
        Ok(Self {
            http,
            base,
            token: body["access_token"].as_str().context("access_token")?.to_string(),
            user_id: body["user_id"].as_str().context("user_id")?.to_string(),
            device_id: body["device_id"].as_str().unwrap_or(device_id).to_string(),
        })
    }

    /// Uses an existing access token (`whoami` tells the user and device).
    pub async fn with_token(base: &str, token: &str) -> Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(90)).build()?;
        let base = base.trim_end_matches('/').to_string();
        let response = http
            .get(format!("{base}/_matrix/client/v3/account/whoami"))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.context("whoami answer")?;
        if !status.is_success() {
            bail!(
                "the access token was refused: {status} {}",
                body["errcode"].as_str().unwrap_or("")
            );
        }
        Ok(Self {
            http,
            base,
            token: token.to_string(),
            user_id: body["user_id"].as_str().context("user_id")?.to_string(),
            device_id: body["device_id"].as_str().unwrap_or("SWITCHBOARDBOT").to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/_matrix/client/v3{path}", self.base)
    }

    /// One `/sync`: waits up to `timeout` for news after `since`.
    pub async fn sync(&self, since: Option<&str>, timeout: Duration) -> Result<SyncBatch> {
        let mut request = self
            .http
            .get(self.url("/sync"))
            .bearer_auth(&self.token)
            .query(&[("timeout", timeout.as_millis().to_string())]);
        if let Some(since) = since {
            request = request.query(&[("since", since)]);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await.context("sync answer")?;
        if !status.is_success() {
            bail!("sync failed: {status} {}", body["errcode"].as_str().unwrap_or(""));
        }
        let mut batch = SyncBatch {
            next_batch: body["next_batch"].as_str().context("next_batch")?.to_string(),
            ..Default::default()
        };
        if let Some(invites) = body["rooms"]["invite"].as_object() {
            for (room, data) in invites {
                // The inviter is the sender of our own member event in the invite state.
                let inviter = data["invite_state"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|e| {
                        (e["type"] == "m.room.member" && e["state_key"] == self.user_id.as_str())
                            .then(|| e["sender"].as_str().map(str::to_string))
                            .flatten()
                    });
                batch.invites.push((room.clone(), inviter));
            }
        }
        if let Some(joined) = body["rooms"]["join"].as_object() {
            for (room, data) in joined {
                let state = data["state"]["events"].as_array().into_iter().flatten();
                let timeline = data["timeline"]["events"].as_array().into_iter().flatten();
                for event in state.chain(timeline) {
                    batch.timeline.push((room.clone(), event.clone()));
                }
            }
        }
        if let Some(left) = body["rooms"]["leave"].as_object() {
            batch.left.extend(left.keys().cloned());
        }
        Ok(batch)
    }

    pub async fn join(&self, room_id: &str) -> Result<()> {
        let url = self.url(&format!("/rooms/{}/join", encode(room_id)));
        self.request(Method::POST, &url, &json!({}), Retry::Idempotent)
            .await
            .with_context(|| format!("joining {room_id}"))?;
        Ok(())
    }

    pub async fn leave(&self, room_id: &str) -> Result<()> {
        let url = self.url(&format!("/rooms/{}/leave", encode(room_id)));
        self.http
            .post(url)
            .bearer_auth(&self.token)
            .json(&json!({}))
            .send()
            .await?;
        Ok(())
    }

    /// Creates a room (`body` as `/createRoom` takes it) and returns its id.
    pub async fn create_room(&self, body: &Value) -> Result<String> {
        // Not idempotent: retried only when the server refused it for now (429).
        let answer = self
            .request(Method::POST, &self.url("/createRoom"), body, Retry::RateLimitOnly)
            .await
            .context("creating a room")?;
        Ok(answer["room_id"].as_str().context("room_id")?.to_string())
    }

    /// Sends a room event with transaction id `txn_id`, retrying on transient
    /// failures (the same id makes a retry idempotent).
    pub async fn send(&self, room_id: &str, event_type: &str, txn_id: &str, content: &Value) -> Result<String> {
        let url = self.url(&format!(
            "/rooms/{}/send/{}/{}",
            encode(room_id),
            encode(event_type),
            encode(txn_id)
        ));
        let answer = self
            .request(Method::PUT, &url, content, Retry::Idempotent)
            .await
            .with_context(|| format!("sending {event_type} to {room_id}"))?;
        Ok(answer["event_id"].as_str().unwrap_or_default().to_string())
    }

    /// One request, its JSON answer on success. A `429` is waited out as long
    /// as its `retry_after_ms` asks (the server did nothing); network errors
    /// and 5xx answers are retried only for idempotent requests; other errors
    /// end it with their status and `errcode`.
    async fn request(&self, method: Method, url: &str, body: &Value, retry: Retry) -> Result<Value> {
        let mut delay = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        let mut failure = String::new();
        for attempt in 1..=SEND_ATTEMPTS {
            let sent = self
                .http
                .request(method.clone(), url)
                .bearer_auth(&self.token)
                .json(body)
                .send()
                .await;
            let wait = match sent {
                Ok(response) if response.status().is_success() => {
                    return Ok(response.json().await.unwrap_or_default());
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let answer: Value = response.json().await.unwrap_or_default();
                    let asked = answer["retry_after_ms"].as_u64().map(Duration::from_millis);
                    tracing::debug!(attempt, ?asked, "rate-limited, retrying");
                    failure = format!("429 {}", answer["errcode"].as_str().unwrap_or(""));
                    asked.unwrap_or(delay)
                }
                Ok(response) if response.status().is_client_error() || retry == Retry::RateLimitOnly => {
                    let status = response.status();
                    let answer: Value = response.json().await.unwrap_or_default();
                    bail!("refused: {status} {}", answer["errcode"].as_str().unwrap_or(""));
                }
                Err(e) if retry == Retry::RateLimitOnly => return Err(e.into()),
                Ok(response) => {
                    tracing::debug!(attempt, status = %response.status(), "request failed, retrying");
                    failure = response.status().to_string();
                    delay
                }
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "request failed, retrying");
                    failure = e.to_string();
                    delay
                }
            };
            if attempt == SEND_ATTEMPTS || waited + wait > MAX_RETRY_WAIT {
                break;
            }
            tokio::time::sleep(wait).await;
            waited += wait;
            delay *= 2;
        }
        bail!("gave up after retrying for {waited:?}: {failure}")
    }
}

/// Which failures a request may be repeated after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Network errors, 5xx and 429: repeating it changes nothing.
    Idempotent,
    /// Only 429 (refused before anything happened).
    RateLimitOnly,
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::MatrixClient;
    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::{get, put};
    use serde_json::{Value, json};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// Our client of `routes` (plus `whoami`), served on a free loopback port.
    async fn client_of(routes: axum::Router) -> MatrixClient {
        let app = routes.route(
            "/_matrix/client/v3/account/whoami",
            get(|| async { Json(json!({"user_id": "@bot:hs", "device_id": "D"})) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        MatrixClient::with_token(&base, "token").await.expect("whoami")
    }

    /// A homeserver that rate-limits the first two sends (asking for 300 ms)
    /// and takes the third: the send waits as asked and succeeds.
    #[tokio::test]
    async fn a_rate_limited_send_waits_as_asked_and_goes_through() {
        let sends = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&sends);
        let app = axum::Router::new().route(
            "/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}",
            put(move || {
                let counter = Arc::clone(&counter);
                async move {
                    if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                        let limited = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests",
                                "retry_after_ms": 300});
                        (StatusCode::TOO_MANY_REQUESTS, Json(limited))
                    } else {
                        (StatusCode::OK, Json(json!({"event_id": "$sent"})))
                    }
                }
            }),
        );
        let client = client_of(app).await;
        let started = Instant::now();
        let event_id = client
            .send("!r:hs", "m.call.answer", "txn1", &Value::Null)
            .await
            .expect("sent after the limits");
        assert_eq!(event_id, "$sent");
        assert_eq!(sends.load(Ordering::SeqCst), 3);
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "waited {:?}",
            started.elapsed()
        );
    }

    /// Creating a room is not idempotent: a server error is not repeated (it
    /// may have made the room), where a join would be.
    #[tokio::test]
    async fn a_failed_create_room_is_not_repeated_but_a_join_is() {
        let creates = Arc::new(AtomicU32::new(0));
        let joins = Arc::new(AtomicU32::new(0));
        let (c, j) = (Arc::clone(&creates), Arc::clone(&joins));
        let app = axum::Router::new()
            .route(
                "/_matrix/client/v3/createRoom",
                axum::routing::post(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                    async { (StatusCode::BAD_GATEWAY, Json(json!({}))) }
                }),
            )
            .route(
                "/_matrix/client/v3/rooms/{room}/join",
                axum::routing::post(move || {
                    let first = j.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        if first {
                            (StatusCode::BAD_GATEWAY, Json(json!({})))
                        } else {
                            (StatusCode::OK, Json(json!({"room_id": "!r:hs"})))
                        }
                    }
                }),
            );
        let client = client_of(app).await;
        assert!(client.create_room(&json!({})).await.is_err());
        assert_eq!(creates.load(Ordering::SeqCst), 1);
        client.join("!r:hs").await.expect("joined on the second try");
        assert_eq!(joins.load(Ordering::SeqCst), 2);
    }
}
