//! Switchboard's companion homeserver: the subset of the Matrix
//! [Client-Server API](https://spec.matrix.org/v1.13/client-server-api/) that
//! real clients (matrix-js-sdk, Element Web's SDK) need to register, make rooms,
//! sync and place calls.
//!
//! The model:
//! - [`Homeserver`] is the state: config, the [`store::Store`] (one owner behind
//!   one mutex, so writes are serialized and each is one transaction), a
//!   [`tokio::sync::watch`] of the stream position that wakes long-polling
//!   `/sync` requests, rate limiters and counters.
//! - [`router`] gives the axum routes (under `/_matrix/client/{v3,r0}`), with
//!   CORS on every route and Matrix errors (`{errcode, error}`) everywhere.
//! - Handlers parse JSON into typed requests at the edge ([`extract`]), check
//!   membership and power levels ([`rules`]), and append events atomically.
//!
//! No federation: this server is one island, and the conference bot talks to it
//! over the same HTTP API as any client.

pub mod api;
pub mod error;
pub mod extract;
pub mod ids;
pub mod ratelimit;
pub mod rules;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use api::router;
pub use error::{ApiResult, MatrixError};
use store::{Store, StreamPos};
use turn_config::SharedSecret;

/// Settings of the homeserver (validated by the binary's config layer).
#[derive(Debug, Clone)]
pub struct HomeserverConfig {
    /// The `server_name` in user and room ids, e.g. `localhost`.
    pub server_name: String,
    /// The client-facing base URL, for `/.well-known/matrix/client`.
    pub public_base_url: String,
    /// Whether new users may register.
    pub registration_enabled: bool,
    /// Register/login requests per second per client address, and the burst allowed.
    pub login_rate_per_second: f64,
    pub login_burst: u32,
    /// TURN URIs advertised by `/voip/turnServer` (empty: the endpoint returns `{}`).
    pub turn_uris: Vec<String>,
    pub turn_secret: SharedSecret,
    pub turn_ttl: Duration,
}

/// Counters exported on `/metrics`; values only, names live in the binary.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub registrations: AtomicU64,
    pub logins: AtomicU64,
    pub events_sent: AtomicU64,
    pub to_device_sent: AtomicU64,
    pub syncs: AtomicU64,
    pub syncs_waiting: AtomicU64,
    pub rate_limited: AtomicU64,
    pub turn_credentials: AtomicU64,
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The homeserver's state, shared by all request handlers.
pub struct Homeserver {
    pub config: HomeserverConfig,
    store: Mutex<Box<dyn Store>>,
    stream: tokio::sync::watch::Sender<StreamPos>,
    login_limiter: ratelimit::RateLimiter,
    pub stats: Stats,
}

impl std::fmt::Debug for Homeserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Homeserver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Homeserver {
    pub fn new(config: HomeserverConfig, store: Box<dyn Store>) -> Arc<Self> {
        let (stream, _) = tokio::sync::watch::channel(store.current_pos());
        let login_limiter = ratelimit::RateLimiter::new(config.login_rate_per_second, config.login_burst);
        Arc::new(Self {
            config,
            store: Mutex::new(store),
            stream,
            login_limiter,
            stats: Stats::default(),
        })
    }

    /// Runs `f` with exclusive access to the store, then wakes `/sync` waiters
    /// if the stream moved.
    ///
    /// Store calls are short (indexed SQLite statements, no fsync per commit in
    /// WAL mode), so they run inline on the calling task: measured here, handing
    /// each call to a blocking thread cost more in context switches than the
    /// queries themselves. CPU-heavy work (password hashing) goes elsewhere.
    pub async fn with_store<T, F>(self: &Arc<Self>, f: F) -> ApiResult<T>
    where
        F: FnOnce(&mut dyn Store) -> ApiResult<T>,
    {
        // A poisoned lock means a panic inside a store call; SQLite rolled the
        // transaction back, so the store itself is consistent.
        let mut store = self.store.lock().unwrap_or_else(|poison| poison.into_inner());
        let result = f(store.as_mut());
        let pos = store.current_pos();
        drop(store);
        self.stream.send_if_modified(|current| {
            let moved = pos > *current;
            if moved {
                *current = pos;
            }
            moved
        });
        result
    }

    /// A receiver that changes whenever something is appended to the stream.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<StreamPos> {
        self.stream.subscribe()
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.config.server_name)
    }
}

/// Milliseconds since the Unix epoch (for `origin_server_ts` and `unsigned.age`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
