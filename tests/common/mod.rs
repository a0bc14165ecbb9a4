//! Shared helpers for integration tests: a real server on 127.0.0.1:0 and a
//! small Matrix client over real HTTP.
#![allow(dead_code)]

use reqwest::Method;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use switchboard::app::{self, Mode, Running};
use switchboard::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A server started in this process with its own data directory.
pub struct TestServer {
    pub running: Running,
    pub base: String,
    pub data_dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::for_tests(data_dir.path());
        tweak(&mut config);
        let running = app::start(config, Mode::AllInOne).await.expect("server starts");
        let base = format!("http://{}", running.http_addr);
        Self {
            running,
            base,
            data_dir,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base)
    }

    /// Registers `name` with password `password` and returns a logged-in client.
    pub async fn user(&self, name: &str) -> Client {
        let mut client = self.client();
        client.register(name, "correct horse").await;
        client
    }
}

/// The real `switchboard` binary as a child process.
pub struct BinaryServer {
    pub child: tokio::process::Child,
    pub base: String,
}

impl BinaryServer {
    /// Starts the binary on a free port with `data_dir` and waits for its URL line.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args([
                "--data-dir",
                data_dir.to_str().expect("utf-8 path"),
                "--bind",
                "127.0.0.1:0",
                // Never assume 3478 is free.
                "--set",
                "turn.listening_port=0",
            ])
            .args(extra)
            .env("SWITCHBOARD_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn switchboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.trim().strip_prefix("Homeserver (Matrix Client-Server API): ") {
                    return url.replace("localhost", "127.0.0.1");
                }
            }
            panic!("switchboard exited before printing its URL");
        })
        .await
        .expect("switchboard printed its URL in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, base }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base)
    }
}

/// Synapse, the reference Matrix homeserver (from PyPI, installed into
/// `target/synapse` by scripts/test.sh; `SYNAPSE_PYTHON` names another Python
/// that has it), on a free loopback port with open registration, its state in
/// a temporary directory. Its default rate limit on sending events stays; the
/// others (registration, login, joins, invites) are lifted for the tests.
pub struct Synapse {
    _child: tokio::process::Child,
    pub base: String,
    python: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Synapse {
    pub const SERVER_NAME: &'static str = "synapse.test";

    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// With `extra` appended to its YAML config (later keys win).
    pub async fn start_with(extra: &str) -> Self {
        let python = std::env::var_os("SYNAPSE_PYTHON").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/synapse/bin/python"),
            PathBuf::from,
        );
        assert!(
            python.exists(),
            "Synapse is not installed at {}: run scripts/test.sh (SYNAPSE_PYTHON names another \
             Python with matrix-synapse)",
            python.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("homeserver.yaml");
        let generated = tokio::process::Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--server-name", Self::SERVER_NAME])
            .arg("--config-path")
            .arg(&config)
            .arg("--data-directory")
            .arg(dir.path())
            .args(["--generate-config", "--report-stats=no"])
            .stdout(Stdio::null())
            .status()
            .await
            .expect("run Synapse's config generator");
        assert!(generated.success(), "Synapse could not generate its config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let generated = std::fs::read_to_string(&config).expect("read Synapse's config");
        assert!(generated.contains("port: 8008"), "Synapse's generated listener moved");
        // Later keys win in YAML as Synapse reads it: the additions override.
        let config_text = generated
            .replace("    - ::1\n", "")
            .replace("port: 8008", &format!("port: {port}"))
            + "\nenable_registration: true\nenable_registration_without_verification: true\n\
               rc_registration: {per_second: 10000, burst_count: 10000}\n\
               rc_joins: {local: {per_second: 10000, burst_count: 10000}}\n\
               rc_invites: {per_room: {per_second: 10000, burst_count: 10000}, \
               per_user: {per_second: 10000, burst_count: 10000}}\n\
               rc_login: {address: {per_second: 10000, burst_count: 10000}, \
               account: {per_second: 10000, burst_count: 10000}, \
               failed_attempts: {per_second: 10000, burst_count: 10000}}\n"
            + extra;
        // Its generated logging writes `homeserver.log` into the working
        // directory: log warnings to stderr instead (kept in the temp dir).
        let log_config = dir.path().join("log.yaml");
        std::fs::write(
            &log_config,
            "version: 1\nformatters: {plain: {format: '%(asctime)s %(name)s %(levelname)s %(message)s'}}\n\
             handlers: {console: {class: logging.StreamHandler, formatter: plain}}\n\
             root: {level: WARNING, handlers: [console]}\ndisable_existing_loggers: false\n",
        )
        .expect("write Synapse's log config");
        let config_text = format!("{config_text}log_config: \"{}\"\n", log_config.display());
        std::fs::write(&config, config_text).expect("write Synapse's config");
        let log = std::fs::File::create(dir.path().join("stdout.log")).expect("log file");
        let child = tokio::process::Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(&config)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start Synapse");
        let config = config.clone();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..300 {
            let up = http
                .get(format!("{base}/_matrix/client/versions"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Self {
                    _child: child,
                    base,
                    python,
                    config,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(dir.path().join("stdout.log")).unwrap_or_default();
        panic!("Synapse did not answer within 60 s:\n{log}");
    }

    /// Lifts Synapse's event rate limit for `user_id`, as an operator does for
    /// the conference bot (its admin API, with an admin made by Synapse's own
    /// `register_new_matrix_user`).
    pub async fn exempt_from_rate_limits(&self, user_id: &str) {
        let tool = self.python.with_file_name("register_new_matrix_user");
        let made = tokio::process::Command::new(&tool)
            .args(["-u", "admin", "-p", "admin password", "-a", "-c"])
            .arg(&self.config)
            .arg(&self.base)
            .stdout(Stdio::null())
            .status()
            .await
            .expect("run register_new_matrix_user");
        assert!(made.success(), "register_new_matrix_user failed");
        let mut admin = Client::new(&self.base);
        let (status, login) = admin
            .post(
                "/login",
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "admin"},
                       "password": "admin password"}),
            )
            .await;
        assert_eq!(status, 200, "admin login: {login}");
        admin.adopt(&login);
        let response = admin
            .http
            .post(format!(
                "{}/_synapse/admin/v1/users/{}/override_ratelimit",
                self.base,
                enc(user_id)
            ))
            .bearer_auth(admin.token.as_deref().unwrap_or_default())
            .json(&json!({"messages_per_second": 0, "burst_count": 0}))
            .send()
            .await
            .expect("override_ratelimit");
        assert!(
            response.status().is_success(),
            "override_ratelimit: {}",
            response.status()
        );
    }
}

pub fn data_dir_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().to_path_buf()
}

/// A minimal Matrix client: JSON in, `(status, JSON)` out.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
    pub user_id: String,
    pub device_id: String,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            base: base.to_string(),
            token: None,
            user_id: String::new(),
            device_id: String::new(),
        }
    }

    /// Sends a request with the client's token; `path` is under `/_matrix/client/v3`
    /// unless it starts with `/_` or `/.`.
    pub async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        let url = if path.starts_with("/_")
            || path.starts_with("/.")
            || path.starts_with("/healthz")
            || path.starts_with("/metrics")
        {
            format!("{}{path}", self.base)
        } else {
            format!("{}/_matrix/client/v3{path}", self.base)
        };
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.expect("request reaches the server");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("response body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.raw(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.raw(Method::POST, path, Some(body.to_string().into_bytes())).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.raw(Method::PUT, path, Some(body.to_string().into_bytes())).await
    }

    /// Registers through the dummy UIA stage and keeps the session.
    pub async fn register(&mut self, name: &str, password: &str) -> Value {
        let (status, first) = self
            .post("/register", json!({ "username": name, "password": password }))
            .await;
        assert_eq!(status, 401, "UIA first: {first}");
        let session = first["session"].clone();
        let (status, body) = self
            .post(
                "/register",
                json!({ "username": name, "password": password, "auth": { "type": "m.login.dummy", "session": session } }),
            )
            .await;
        assert_eq!(status, 200, "register {name}: {body}");
        self.adopt(&body);
        body
    }

    pub fn adopt(&mut self, login: &Value) {
        self.token = login["access_token"].as_str().map(str::to_string);
        self.user_id = login["user_id"].as_str().unwrap_or_default().to_string();
        self.device_id = login["device_id"].as_str().unwrap_or_default().to_string();
    }

    pub async fn create_room(&self, body: Value) -> String {
        let (status, resp) = self.post("/createRoom", body).await;
        assert_eq!(status, 200, "createRoom: {resp}");
        resp["room_id"].as_str().expect("room_id").to_string()
    }

    pub async fn send(&self, room: &str, kind: &str, txn: &str, content: Value) -> (u16, Value) {
        self.put(&format!("/rooms/{}/send/{kind}/{txn}", enc(room)), content)
            .await
    }

    pub async fn send_text(&self, room: &str, txn: &str, text: &str) -> String {
        let (status, body) = self
            .send(
                room,
                "m.room.message",
                txn,
                json!({ "msgtype": "m.text", "body": text }),
            )
            .await;
        assert_eq!(status, 200, "send: {body}");
        body["event_id"].as_str().expect("event_id").to_string()
    }

    pub async fn sync(&self, query: &str) -> Value {
        let (status, body) = self.get(&format!("/sync{query}")).await;
        assert_eq!(status, 200, "sync: {body}");
        body
    }

    pub async fn invite(&self, room: &str, user: &str) -> (u16, Value) {
        self.post(&format!("/rooms/{}/invite", enc(room)), json!({ "user_id": user }))
            .await
    }

    pub async fn join(&self, room: &str) -> (u16, Value) {
        self.post(&format!("/rooms/{}/join", enc(room)), json!({})).await
    }

    pub async fn leave(&self, room: &str) -> (u16, Value) {
        self.post(&format!("/rooms/{}/leave", enc(room)), json!({})).await
    }
}

/// Percent-encodes a path segment (room ids contain `!` and `:`).
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Event types of a timeline or event list.
pub fn types(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|a| a.iter().map(|e| e["type"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// Bodies of `m.room.message` events in a list.
pub fn bodies(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A WebRTC peer of the test: str0m on a loopback UDP socket, sending audio
/// and video on two m-lines.
pub struct Peer {
    pub rtc: str0m::Rtc,
    pub socket: tokio::net::UdpSocket,
    pub local: std::net::SocketAddr,
    /// Sends real opus of a sine at this frequency (and decodes what arrives
    /// on its own audio m-line) instead of dummy audio.
    pub tone: Option<f32>,
}

impl Peer {
    pub async fn new() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a loopback socket");
        let local = socket.local_addr().expect("its address");
        let mut rtc = str0m::RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(std::time::Instant::now());
        rtc.add_local_candidate(str0m::Candidate::host(local, "udp").expect("a host candidate"));
        Self {
            rtc,
            socket,
            local,
            tone: None,
        }
    }
}
