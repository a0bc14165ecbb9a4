//! Starts the parts of Switchboard and owns their lifetime.
//!
//! The parts are the companion homeserver, the SFU media shards, the
//! conference bot, the TURN relay, the web demo and the operational endpoints;
//! the mode says which run.

use crate::bot::{Bot, BotPolicy};
use crate::config::Config;
use crate::drivers::matrix::MatrixClient;
use crate::drivers::media::{MediaTuning, ShardSet};
use crate::drivers::turn::{TurnHandle, TurnSettings};
use crate::secrets;
use anyhow::{Context, Result};
use homeserver::store::SqliteStore;
use homeserver::{Homeserver, HomeserverConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use turn_config::SharedSecret;

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything, on localhost by default.
    AllInOne,
    /// Only the companion homeserver.
    Homeserver,
    /// The conference bot and the SFU, attached to another homeserver.
    Bot,
    /// Only the TURN relay (and the operational endpoints).
    Turn,
}

/// A running instance.
#[derive(Debug)]
pub struct Running {
    /// Where the HTTP server listens.
    pub http_addr: SocketAddr,
    /// The base URL clients should use.
    pub base_url: String,
    /// The homeserver (absent in bot mode).
    pub homeserver: Option<Arc<Homeserver>>,
    /// The SFU shards (all-in-one mode).
    pub media: Option<ShardSet>,
    /// The conference bot's user id.
    pub bot_user: Option<String>,
    /// The TURN relay.
    pub turn: Option<Arc<TurnHandle>>,
    /// The TURN URIs `/voip/turnServer` hands out.
    pub turn_uris: Vec<String>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The URLs a person opens, one per line.
    pub fn urls(&self) -> Vec<(&'static str, String)> {
        let mut urls = Vec::new();
        if self.homeserver.is_some() {
            urls.push((
                "Web demo (open it in two browser tabs)",
                format!("{}{}", self.base_url, web_demo::MOUNT),
            ));
            urls.push(("Homeserver (Matrix Client-Server API)", self.base_url.clone()));
        }
        urls.push(("Health", format!("{}/healthz", self.base_url)));
        urls.push(("Metrics", format!("{}/metrics", self.base_url)));
        if let Some(media) = &self.media {
            let ports: Vec<String> = media.shards().iter().map(|s| s.advertised_addr.to_string()).collect();
            urls.push(("SFU media (UDP, one port per shard)", ports.join(" ")));
        }
        if self.turn.is_some() {
            urls.push(("TURN relay", self.turn_uris.join(" ")));
        }
        if let Some(bot) = &self.bot_user {
            urls.push(("Conference bot (invite it to a room, then call it)", bot.clone()));
        }
        urls
    }

    /// Stops accepting requests and waits (briefly) for those in flight.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // Long-polling syncs may hold connections open; give them a moment only.
        let _ = tokio::time::timeout(Duration::from_secs(3), self.server).await;
    }

    /// Waits until the server stops by itself (it only does on error).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.server)
            .await
            .context("HTTP server task")?
            .context("HTTP server")
    }
}

/// How the bot reaches its homeserver.
struct BotLogin {
    homeserver: String,
    localpart: String,
    password: String,
    access_token: String,
}

impl BotLogin {
    async fn connect(&self) -> Result<MatrixClient> {
        if self.access_token.is_empty() {
            MatrixClient::login_or_register(&self.homeserver, &self.localpart, &self.password, "SWITCHBOARDBOT").await
        } else {
            MatrixClient::with_token(&self.homeserver, &self.access_token).await
        }
    }
}

/// All-in-one: our own homeserver, a password generated once into the data
/// directory. `switchboard bot`: the configured homeserver and credentials.
fn bot_login(config: &Config, mode: Mode, http_addr: SocketAddr) -> Result<BotLogin> {
    let bot = &config.bot;
    if mode == Mode::Bot {
        anyhow::ensure!(
            !bot.homeserver_url.is_empty(),
            "config key 'bot.homeserver_url': required for `switchboard bot`"
        );
        anyhow::ensure!(
            !bot.password.is_empty() || !bot.access_token.is_empty(),
            "config key 'bot.password' or 'bot.access_token': one is required for `switchboard bot`"
        );
    }
    let homeserver = if bot.homeserver_url.is_empty() {
        format!("http://{http_addr}")
    } else {
        bot.homeserver_url.clone()
    };
    let password = if bot.password.is_empty() && bot.access_token.is_empty() {
        secrets::load_or_generate(&config.data_dir.join("bot_password"))?
    } else {
        bot.password.clone()
    };
    Ok(BotLogin {
        homeserver,
        localpart: bot.localpart.clone(),
        password,
        access_token: bot.access_token.clone(),
    })
}

/// Starts the parts of `mode` with `config`.
pub async fn start(config: Config, mode: Mode) -> Result<Running> {
    let started = Instant::now();
    anyhow::ensure!(
        mode != Mode::Turn || !config.turn.static_auth_secret.is_empty(),
        "config key 'turn.static_auth_secret': required for `switchboard turn`: the secret the \
         homeserver mints credentials with (Synapse's turn_shared_secret)"
    );
    secrets::ensure_data_dir(&config.data_dir)?;
    let turn_secret = if config.turn.static_auth_secret.is_empty() {
        secrets::load_or_generate(&config.data_dir.join("turn_secret"))?
    } else {
        config.turn.static_auth_secret.clone()
    };

    let listener = tokio::net::TcpListener::bind(config.http.bind).await.with_context(|| {
        format!(
            "binding the HTTP listener to {} (set http.bind or --bind)",
            config.http.bind
        )
    })?;
    let http_addr = listener.local_addr()?;
    let base_url = if config.http.public_base_url.is_empty() {
        let host = match http_addr.ip() {
            ip if ip.is_unspecified() || ip.is_loopback() => "localhost".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        format!("http://{host}:{}", http_addr.port())
    } else {
        config.http.public_base_url.trim_end_matches('/').to_string()
    };

    let turn = if mode == Mode::Turn || (mode == Mode::AllInOne && config.turn.enabled) {
        Some(Arc::new(start_turn(&config, mode, &turn_secret, http_addr)?))
    } else {
        None
    };
    let turn_uris = match &turn {
        Some(turn) if config.turn.uris.is_empty() => advertised_turn_uris(&config, turn),
        _ => config.turn.uris.clone(),
    };

    let hs = if matches!(mode, Mode::Bot | Mode::Turn) {
        None
    } else {
        let db_path = config.data_dir.join("homeserver.sqlite");
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db_path))
            .await?
            .context("opening the homeserver database")?;
        Some(Homeserver::new(
            HomeserverConfig {
                server_name: config.server_name.clone(),
                public_base_url: base_url.clone(),
                registration_enabled: config.registration.enabled,
                login_rate_per_second: config.rate_limit.login_per_second,
                login_burst: config.rate_limit.login_burst,
                turn_uris: turn_uris.clone(),
                turn_secret: SharedSecret::new(turn_secret),
                turn_ttl: Duration::from_secs(config.turn.credential_ttl_secs),
            },
            Box::new(store),
        ))
    };

    let (media, media_events) = if matches!(mode, Mode::AllInOne | Mode::Bot) {
        let tuning = MediaTuning {
            mixer: sfu::MixerConfig {
                max_speakers: config.media.mix_speakers,
                bitrate_bps: config.media.mix_bitrate,
                ..sfu::MixerConfig::default()
            },
            video_hold_off: Duration::from_millis(config.media.video_hold_off_ms),
        };
        let (shards, events) = ShardSet::spawn_with(
            config.media.bind,
            config.media_advertised_ip(),
            config.media.shards,
            tuning,
        )?;
        (Some(shards), Some(events))
    } else {
        (None, None)
    };

    let app = crate::http::router(hs.clone(), media.clone(), turn.clone(), started);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            })
            .await
    });
    if let (Some(shards), Some(mut events)) = (media.clone(), media_events) {
        if config.bot.enabled || mode == Mode::Bot {
            let login = bot_login(&config, mode, http_addr)?;
            let policy = BotPolicy {
                allowed: config.bot.allowed.clone(),
                sync_token_path: Some(config.data_dir.join("bot_sync_token")),
                conference_mode: config.bot.conference_mode,
                record_conferences: config.bot.record_conferences,
                recordings_dir: Some(config.data_dir.join("recordings")),
                record_wanted_path: Some(config.data_dir.join("bot_record_wanted")),
            };
            // All-in-one: our own server answers at once, so the bot is ready
            // before the URLs are printed. Attached elsewhere: retry until the
            // homeserver answers.
            let ready = if mode == Mode::AllInOne {
                Some(login.connect().await.context("starting the conference bot")?)
            } else {
                None
            };
            tokio::spawn(async move {
                let matrix = match ready {
                    Some(matrix) => matrix,
                    None => loop {
                        match login.connect().await {
                            Ok(matrix) => break matrix,
                            Err(e) => {
                                tracing::warn!(error = %e, "the conference bot could not log in; retrying in 5 s");
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                        }
                    },
                };
                if let Err(e) = Bot::new(matrix, shards, policy).run(events).await {
                    tracing::error!(error = %e, "the conference bot stopped");
                }
            });
        } else {
            // Nobody opens sessions without the bot; keep the queue empty.
            tokio::spawn(async move { while events.recv().await.is_some() {} });
        }
    }
    tracing::info!(?mode, %http_addr, server_name = %config.server_name, "switchboard started");
    let bot_user = match mode {
        Mode::Bot => Some(format!("{} on {}", config.bot.localpart, config.bot.homeserver_url)),
        _ if media.is_some() && config.bot.enabled => Some(format!("@{}:{}", config.bot.localpart, config.server_name)),
        _ => None,
    };
    Ok(Running {
        http_addr,
        base_url,
        homeserver: hs,
        media,
        bot_user,
        turn,
        turn_uris,
        shutdown,
        server,
    })
}

/// Starts the TURN relay with the homeserver's secret. All-in-one on a
/// loopback listener allows loopback peers: everything there is local.
fn start_turn(config: &Config, mode: Mode, secret: &str, http_addr: SocketAddr) -> Result<TurnHandle> {
    use turn_config::policy::{PeerPolicy, parse_ranges};
    let turn = &config.turn;
    let listening_ip: IpAddr = turn.listening_ip.parse().context("turn.listening_ip")?;
    let relay_ip: IpAddr = if turn.relay_ip.is_empty() {
        listening_ip
    } else {
        turn.relay_ip.parse().context("turn.relay_ip")?
    };
    let external_ip: Option<IpAddr> = if turn.external_ip.is_empty() {
        None
    } else {
        Some(turn.external_ip.parse().context("turn.external_ip")?)
    };
    let denied = parse_ranges(&turn.denied_peer_ip).context("turn.denied_peer_ip")?;
    let allowed = parse_ranges(&turn.allowed_peer_ip).context("turn.allowed_peer_ip")?;
    let mut policy = PeerPolicy::new(&denied, &allowed);
    if turn.allow_loopback_peers {
        tracing::warn!("the TURN relay allows loopback peers (turn.allow_loopback_peers)");
        policy.allow_loopback();
    } else if mode == Mode::AllInOne && listening_ip.is_loopback() {
        tracing::info!("the TURN relay allows loopback peers: all-in-one on localhost, where every peer is local");
        policy.allow_loopback();
    }
    let mut nonce_key = [0u8; 32];
    getrandom::fill(&mut nonce_key).map_err(|e| anyhow::anyhow!("the OS random number generator failed: {e}"))?;
    let mut relay = turn_config::RelayConfig::new(config.turn_realm(), SharedSecret::new(secret), nonce_key);
    relay.policy = policy;
    relay.user_quota = turn.user_quota;
    relay.total_quota = turn.total_quota;
    relay.max_bps = turn.max_bps;
    relay.max_lifetime = Duration::from_secs(turn.max_allocate_lifetime);
    relay.default_lifetime = relay.default_lifetime.min(relay.max_lifetime);
    relay.nonce_lifetime = Duration::from_secs(turn.stale_nonce);
    let tls = if turn.cert.is_empty() {
        None
    } else {
        let tls_config = crate::tls::server_config(Path::new(&turn.cert), Path::new(&turn.pkey))?;
        Some((SocketAddr::new(listening_ip, turn.tls_listening_port), tls_config))
    };
    let handle = crate::drivers::turn::spawn(TurnSettings {
        listen: SocketAddr::new(listening_ip, turn.listening_port),
        tls,
        relay_ip,
        external_ip,
        ports: (turn.min_port, turn.max_port),
        services: vec![http_addr],
        relay,
    })?;
    tracing::info!(udp = %handle.udp_addr, tcp = %handle.tcp_addr, tls = ?handle.tls_addr, "TURN relay listening");
    Ok(handle)
}

/// `turn:HOST:PORT?transport=udp` and `?transport=tcp` (and `turns:` with TLS).
fn advertised_turn_uris(config: &Config, turn: &TurnHandle) -> Vec<String> {
    let ip = if config.turn.external_ip.is_empty() {
        turn.udp_addr.ip()
    } else {
        config.turn.external_ip.parse().unwrap_or(turn.udp_addr.ip())
    };
    let host = match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let mut uris = vec![
        format!("turn:{host}:{}?transport=udp", turn.udp_addr.port()),
        format!("turn:{host}:{}?transport=tcp", turn.tcp_addr.port()),
    ];
    if let Some(tls) = turn.tls_addr {
        uris.push(format!("turns:{host}:{}?transport=tcp", tls.port()));
    }
    uris
}
