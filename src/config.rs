//! Configuration: defaults ← TOML file ← `SWITCHBOARD_*` environment ← flags,
//! merged as TOML tables, then deserialized into typed settings and validated.
//! Every error names the key at fault.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Prefix of the environment variables that set config keys
/// (`SWITCHBOARD_HTTP_BIND` sets `http.bind`).
pub const ENV_PREFIX: &str = "SWITCHBOARD_";
/// Environment variables with the prefix that are not config keys.
const ENV_NOT_KEYS: &[&str] = &["SWITCHBOARD_CONFIG"];
const MASK: &str = "********";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name in Matrix ids (`@alice:<server_name>`).
    pub server_name: String,
    /// Holds the database and generated secrets; created if missing.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub registration: RegistrationConfig,
    pub rate_limit: RateLimitConfig,
    pub turn: TurnConfig,
    pub media: MediaConfig,
    pub bot: BotConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotConfig {
    /// Run the conference bot (all-in-one mode).
    pub enabled: bool,
    /// Its user's localpart: `@<localpart>:<server_name>`.
    pub localpart: String,
    /// User ids (`@a:hs`) or server names (`hs`) whose invites it accepts; empty: everyone's.
    pub allowed: Vec<String>,
    /// The homeserver it logs in to; empty: ours (all-in-one).
    pub homeserver_url: String,
    /// Its password on that homeserver; empty in all-in-one: generated into the data directory.
    pub password: String,
    /// An access token to use instead of a password.
    pub access_token: String,
    /// What callers get unless their call or room says otherwise:
    /// `multi_stream` (one stream per participant) or `single_stream` (the
    /// conference's audio mixed without their own voice, and the active
    /// speaker's video). Callers that cannot renegotiate are always single-stream.
    pub conference_mode: ConferenceMode,
    /// Record every conference's audio (Ogg/Opus in `data_dir/recordings`), as
    /// if `!record start` had been said in each room.
    pub record_conferences: bool,
}

/// How a caller receives a conference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConferenceMode {
    /// One stream per other participant (renegotiated as they come and go).
    MultiStream,
    /// One mixed audio stream (mix-minus) and the active speaker's video.
    SingleStream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Where the first SFU shard's UDP socket binds; shard `i` uses port + i
    /// (port 0: each shard picks a free port).
    pub bind: SocketAddr,
    /// The IP put in SDP answers (the public address of a host behind NAT);
    /// empty: the bound IP.
    pub advertised_ip: String,
    /// SFU shards (threads, one UDP port each); 0 = one per CPU core.
    pub shards: usize,
    /// How many of the loudest speakers single-stream callers hear mixed.
    pub mix_speakers: usize,
    /// Opus bitrate of each mix, in bits per second.
    pub mix_bitrate: u32,
    /// A single-stream caller's video moves to a new speaker only once that
    /// speaker has held the floor this long (milliseconds).
    pub video_hold_off_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,switchboard_homeserver=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the homeserver, `/metrics` and `/healthz` listen (port 0 picks a free port).
    pub bind: SocketAddr,
    /// The URL clients use to reach the homeserver; empty derives it from `bind`.
    pub public_base_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Register and login requests per second per client address.
    pub login_per_second: f64,
    /// How many may come at once before the rate applies.
    pub login_burst: u32,
}

/// The TURN relay and the credentials `/voip/turnServer` hands out. Keys are
/// coturn's option names with `_` for `-` (`listening-port` is `listening_port`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Run the embedded relay (all-in-one; `switchboard turn` always runs it).
    pub enabled: bool,
    /// TURN URIs handed out by `/voip/turnServer` (`turn:` or `turns:`); empty
    /// while the relay runs: its own `turn:HOST:PORT?transport=udp|tcp` (and `turns:`).
    pub uris: Vec<String>,
    /// The TURN REST shared secret (coturn's `static-auth-secret`); empty means
    /// generate one in the data directory and keep it there.
    pub static_auth_secret: String,
    /// Lifetime of minted credentials, in seconds.
    pub credential_ttl_secs: u64,
    /// The realm of the long-term credentials; empty: the server name.
    pub realm: String,
    /// Where the UDP and TCP listeners bind.
    pub listening_ip: String,
    /// UDP and TCP listener port (0: a free port).
    pub listening_port: u16,
    /// TLS (`turns:`) listener port, used when `cert` and `pkey` are set.
    pub tls_listening_port: u16,
    /// PEM certificate chain and private key for TLS.
    pub cert: String,
    pub pkey: String,
    /// Relay sockets bind to this IPv4 address; empty: the listening IP.
    pub relay_ip: String,
    /// The address advertised as the relayed address (public IP behind NAT); empty: the relay IP.
    pub external_ip: String,
    /// Relay port range.
    pub min_port: u16,
    pub max_port: u16,
    /// Extra peer ranges to refuse (`IP`, `IP/PREFIX` or `IP1-IP2`), on top of the private ones.
    pub denied_peer_ip: Vec<String>,
    /// Peer ranges to allow even when denied.
    pub allowed_peer_ip: Vec<String>,
    /// Allow loopback peers. All-in-one on a loopback listener allows them anyway.
    pub allow_loopback_peers: bool,
    /// Allocations one user may hold at once (0: no limit).
    pub user_quota: u32,
    /// Allocations the relay holds at once (0: no limit).
    pub total_quota: u32,
    /// Bytes per second per allocation, each direction counted (0: no limit).
    pub max_bps: u64,
    /// Longest allocation lifetime granted, in seconds.
    pub max_allocate_lifetime: u64,
    /// Seconds a nonce stays valid before 438 Stale Nonce.
    pub stale_nonce: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            data_dir: PathBuf::from("switchboard-data"),
            log: LogConfig {
                format: LogFormat::Human,
                level: "info".into(),
            },
            http: HttpConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 8008)),
                public_base_url: String::new(),
            },
            registration: RegistrationConfig { enabled: true },
            // Generous: a demo or test registering dozens of users a minute never meets it.
            rate_limit: RateLimitConfig {
                login_per_second: 5.0,
                login_burst: 100,
            },
            turn: TurnConfig {
                enabled: true,
                uris: Vec::new(),
                static_auth_secret: String::new(),
                credential_ttl_secs: 86_400,
                realm: String::new(),
                listening_ip: "127.0.0.1".into(),
                listening_port: 3478,
                tls_listening_port: 5349,
                cert: String::new(),
                pkey: String::new(),
                relay_ip: String::new(),
                external_ip: String::new(),
                min_port: 49_152,
                max_port: 65_535,
                denied_peer_ip: Vec::new(),
                allowed_peer_ip: Vec::new(),
                allow_loopback_peers: false,
                user_quota: 10,
                total_quota: 0,
                max_bps: 0,
                max_allocate_lifetime: 3600,
                stale_nonce: 600,
            },
            bot: BotConfig {
                enabled: true,
                localpart: "conference".into(),
                allowed: Vec::new(),
                homeserver_url: String::new(),
                password: String::new(),
                access_token: String::new(),
                conference_mode: ConferenceMode::MultiStream,
                record_conferences: false,
            },
            media: MediaConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertised_ip: String::new(),
                shards: 0,
                mix_speakers: 3,
                mix_bitrate: 32_000,
                video_hold_off_ms: 500,
            },
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Config::default().log
    }
}
impl Default for HttpConfig {
    fn default() -> Self {
        Config::default().http
    }
}
impl Default for RegistrationConfig {
    fn default() -> Self {
        Config::default().registration
    }
}
impl Default for RateLimitConfig {
    fn default() -> Self {
        Config::default().rate_limit
    }
}
impl Default for BotConfig {
    fn default() -> Self {
        Config::default().bot
    }
}
impl Default for MediaConfig {
    fn default() -> Self {
        Config::default().media
    }
}
impl Default for TurnConfig {
    fn default() -> Self {
        Config::default().turn
    }
}

/// Where the config comes from, besides the defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `(name, value)` of the process environment.
    pub env: Vec<(String, String)>,
    /// `key=value` overrides from flags, applied last, in order.
    pub overrides: Vec<(String, String)>,
}

impl Config {
    /// Loads and validates the effective config.
    pub fn load(sources: &Sources) -> Result<Self> {
        let defaults = Table::try_from(Config::default()).context("serializing the defaults")?;
        let keys = leaf_keys(&defaults);
        let mut merged = defaults;
        if let Some(path) = &sources.file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
            let file: Table =
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut merged, file);
        }
        let env_keys: BTreeMap<String, &String> = keys
            .keys()
            .map(|k| (format!("{ENV_PREFIX}{}", k.replace('.', "_").to_uppercase()), k))
            .collect();
        for (name, value) in &sources.env {
            if !name.starts_with(ENV_PREFIX) || ENV_NOT_KEYS.contains(&name.as_str()) {
                continue;
            }
            let Some(key) = env_keys.get(name) else {
                bail!("unknown environment variable {name}: no config key matches it");
            };
            set_key(&mut merged, key, value, &keys).with_context(|| format!("in {name}"))?;
        }
        for (key, value) in &sources.overrides {
            if !keys.contains_key(key) {
                bail!("unknown config key '{key}'");
            }
            set_key(&mut merged, key, value, &keys)?;
        }
        let config: Config = serde_path_to_error::deserialize(Value::Table(merged))
            .map_err(|e| anyhow::anyhow!("config key '{}': {}", e.path(), e.inner()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let name_ok = !self.server_name.is_empty()
            && self.server_name.len() <= 230
            && self
                .server_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
        if !name_ok {
            bail!(
                "config key 'server_name': '{}' is not a valid server name",
                self.server_name
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            bail!("config key 'data_dir': must not be empty");
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("config key 'log.level': {e}"))?;
        let url = &self.http.public_base_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            bail!("config key 'http.public_base_url': must start with http:// or https://");
        }
        if !(self.rate_limit.login_per_second > 0.0 && self.rate_limit.login_per_second.is_finite()) {
            bail!("config key 'rate_limit.login_per_second': must be a positive number");
        }
        if self.rate_limit.login_burst == 0 {
            bail!("config key 'rate_limit.login_burst': must be at least 1");
        }
        for uri in &self.turn.uris {
            if !(uri.starts_with("turn:") || uri.starts_with("turns:")) {
                bail!("config key 'turn.uris': '{uri}' is not a turn: or turns: URI");
            }
        }
        if !(60..=7 * 86_400).contains(&self.turn.credential_ttl_secs) {
            bail!("config key 'turn.credential_ttl_secs': must be between 60 and 604800");
        }
        self.validate_turn()?;
        if !self.media.advertised_ip.is_empty() && self.media.advertised_ip.parse::<std::net::IpAddr>().is_err() {
            bail!(
                "config key 'media.advertised_ip': '{}' is not an IP address",
                self.media.advertised_ip
            );
        }
        if self.media.bind.ip().is_unspecified() && self.media.advertised_ip.is_empty() {
            bail!("config key 'media.advertised_ip': required when media.bind listens on all interfaces");
        }
        if self.media.shards > 256 {
            bail!("config key 'media.shards': at most 256");
        }
        if !(1..=8).contains(&self.media.mix_speakers) {
            bail!("config key 'media.mix_speakers': between 1 and 8");
        }
        if !(6_000..=510_000).contains(&self.media.mix_bitrate) {
            bail!("config key 'media.mix_bitrate': between 6000 and 510000 (opus)");
        }
        if self.media.video_hold_off_ms > 10_000 {
            bail!("config key 'media.video_hold_off_ms': at most 10000");
        }
        Ok(())
    }

    fn validate_turn(&self) -> Result<()> {
        let turn = &self.turn;
        let ip = |key: &str, value: &str| -> Result<Option<IpAddr>> {
            if value.is_empty() {
                return Ok(None);
            }
            value
                .parse()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("config key 'turn.{key}': '{value}' is not an IP address"))
        };
        let listening = ip("listening_ip", &turn.listening_ip)?;
        if listening.is_none() {
            bail!("config key 'turn.listening_ip': required");
        }
        if let Some(relay) = ip("relay_ip", &turn.relay_ip)?.or(listening)
            && (!relay.is_ipv4() || relay.is_unspecified())
        {
            bail!(
                "config key 'turn.relay_ip': relay addresses are one IPv4 address (set it when listening_ip is not one)"
            );
        }
        ip("external_ip", &turn.external_ip)?;
        if turn.min_port == 0 || turn.min_port > turn.max_port {
            bail!("config key 'turn.min_port': must be at least 1 and at most turn.max_port");
        }
        for (key, ranges) in [
            ("denied_peer_ip", &turn.denied_peer_ip),
            ("allowed_peer_ip", &turn.allowed_peer_ip),
        ] {
            turn_config::policy::parse_ranges(ranges).map_err(|e| anyhow::anyhow!("config key 'turn.{key}': {e}"))?;
        }
        if turn.cert.is_empty() != turn.pkey.is_empty() {
            bail!("config key 'turn.cert': TLS needs both turn.cert and turn.pkey");
        }
        if !(60..=86_400).contains(&turn.max_allocate_lifetime) {
            bail!("config key 'turn.max_allocate_lifetime': must be between 60 and 86400");
        }
        if !(10..=86_400).contains(&turn.stale_nonce) {
            bail!("config key 'turn.stale_nonce': must be between 10 and 86400");
        }
        Ok(())
    }

    /// The TURN realm: configured, or the server name.
    pub fn turn_realm(&self) -> String {
        if self.turn.realm.is_empty() {
            self.server_name.clone()
        } else {
            self.turn.realm.clone()
        }
    }

    /// The advertised media IP, if one is configured.
    pub fn media_advertised_ip(&self) -> Option<std::net::IpAddr> {
        self.media.advertised_ip.parse().ok()
    }

    /// The effective config as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.turn.static_auth_secret,
            &mut shown.bot.password,
            &mut shown.bot.access_token,
        ] {
            if !secret.is_empty() {
                *secret = MASK.into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot show the config: {e}\n"))
    }

    /// A config for tests: a data directory of their own, a free port, quiet logs.
    pub fn for_tests(data_dir: &Path) -> Self {
        let mut config = Config {
            data_dir: data_dir.to_path_buf(),
            ..Config::default()
        };
        config.http.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        config.log.level = "warn".into();
        config.media.shards = 1;
        config.turn.listening_port = 0;
        // Tests that want the conference bot or the TURN relay turn them on.
        config.bot.enabled = false;
        config.turn.enabled = false;
        config
    }
}

/// Every leaf key of a table as a dotted path, with its default value.
fn leaf_keys(table: &Table) -> BTreeMap<String, Value> {
    let mut keys = BTreeMap::new();
    for (name, value) in table {
        match value {
            Value::Table(inner) => {
                for (sub, v) in leaf_keys(inner) {
                    keys.insert(format!("{name}.{sub}"), v);
                }
            }
            other => {
                keys.insert(name.clone(), other.clone());
            }
        }
    }
    keys
}

fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets a dotted key from a string: TOML syntax if it parses as such (numbers,
/// booleans, arrays), a comma-separated list for list keys, else a string.
fn set_key(table: &mut Table, key: &str, raw: &str, keys: &BTreeMap<String, Value>) -> Result<()> {
    let value = match toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(v) if !matches!(v, Value::Table(_)) => v,
        _ => match keys.get(key) {
            Some(Value::Array(_)) => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            ),
            _ => Value::String(raw.to_string()),
        },
    };
    // Strings where the default is a string: `8008` for a bind address stays text.
    let value = match (keys.get(key), value) {
        (Some(Value::String(_)), v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_))) => {
            Value::String(v.to_string())
        }
        (_, v) => v,
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.pop().context("empty config key")?;
    let mut node = table;
    for part in parts {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .with_context(|| format!("config key '{key}': '{part}' is not a section"))?;
    }
    node.insert(leaf.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], overrides: &[(&str, &str)], file: Option<&str>) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("c{}.toml", env.len() * 10 + overrides.len()));
        let file = file.map(|text| {
            std::fs::write(&path, text).expect("write config");
            path.clone()
        });
        Config::load(&Sources {
            file,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })
    }

    #[test]
    fn layers_apply_in_order() {
        let config = load(
            &[
                ("SWITCHBOARD_HTTP_BIND", "127.0.0.1:9000"),
                ("SWITCHBOARD_TURN_URIS", "turn:a:1,turn:b:2"),
            ],
            &[("server_name", "example.org")],
            Some("server_name = \"file.org\"\n[http]\nbind = \"127.0.0.1:1\"\n[rate_limit]\nlogin_burst = 7\n"),
        )
        .expect("valid");
        assert_eq!(config.server_name, "example.org");
        assert_eq!(config.http.bind.port(), 9000);
        assert_eq!(config.rate_limit.login_burst, 7);
        assert_eq!(config.turn.uris, vec!["turn:a:1", "turn:b:2"]);
        let single = load(&[("SWITCHBOARD_BOT_CONFERENCE_MODE", "single_stream")], &[], None).expect("valid");
        assert_eq!(single.bot.conference_mode, ConferenceMode::SingleStream);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |r: Result<Config>| format!("{:#}", r.expect_err("must fail"));
        assert!(err(load(&[], &[("http.bind", "nonsense")], None)).contains("http.bind"));
        assert!(err(load(&[("SWITCHBOARD_NOPE", "1")], &[], None)).contains("SWITCHBOARD_NOPE"));
        assert!(err(load(&[], &[("turn.uris", "stun:x")], None)).contains("turn.uris"));
        assert!(err(load(&[], &[("rate_limit.login_burst", "0")], None)).contains("rate_limit.login_burst"));
        assert!(err(load(&[], &[("log.format", "xml")], None)).contains("log.format"));
        assert!(err(load(&[], &[], Some("[http]\nbnd = \"x\"\n"))).contains("http"));
        assert!(err(load(&[], &[("no.such", "1")], None)).contains("no.such"));
        assert!(err(load(&[], &[("turn.denied_peer_ip", "10.0.0.0/99")], None)).contains("turn.denied_peer_ip"));
        assert!(err(load(&[], &[("turn.relay_ip", "::1")], None)).contains("turn.relay_ip"));
        assert!(
            err(load(
                &[],
                &[("turn.min_port", "60000"), ("turn.max_port", "50000")],
                None
            ))
            .contains("turn.min_port")
        );
        assert!(err(load(&[], &[("turn.cert", "/x.pem")], None)).contains("turn.cert"));
        assert!(err(load(&[], &[("bot.conference_mode", "mixed")], None)).contains("bot.conference_mode"));
        assert!(err(load(&[], &[("media.mix_speakers", "0")], None)).contains("media.mix_speakers"));
    }

    #[test]
    fn secrets_are_masked() {
        let config = load(&[], &[("turn.static_auth_secret", "hunter2")], None).expect("valid");
        let shown = config.to_masked_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains(MASK));
    }
}
