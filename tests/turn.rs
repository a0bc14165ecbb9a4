//! The TURN relay over real sockets on loopback: coturn's own client
//! (`turnutils_uclient`, Debian package `coturn`) against `switchboard turn`
//! and the all-in-one server, plus refusals and garbage from a small client
//! built on our codec.

mod common;

use common::{Client, Synapse, TestServer};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;
use switchboard::app::{self, Mode, Running};
use switchboard::config::Config;
use turn_config::rest::{SharedSecret, long_term_key};
use turn_config::stun::{Class, Message, MessageWriter, TransactionId, attr, method};

const SECRET: &str = "n0t-a-real-secret";
const REALM: &str = "example.org";

/// A coturn tool, or `None` (a skip) outside CI; in CI a missing tool fails.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing: install Debian's coturn package (scripts/test.sh does)"
        );
        eprintln!("SKIPPED: {name} is not installed (scripts/test.sh installs Debian's coturn)");
    }
    found
}

/// `switchboard turn` in this process, on free ports.
async fn start_relay(tweak: impl FnOnce(&mut Config)) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path());
    config.turn.static_auth_secret = SECRET.into();
    config.turn.realm = REALM.into();
    tweak(&mut config);
    let running = app::start(config, Mode::Turn).await.expect("relay starts");
    (running, dir)
}

fn turn_port(running: &Running) -> u16 {
    running.turn.as_ref().expect("relay runs").udp_addr.port()
}

/// What `turnutils_uclient` printed, and whether it exited successfully.
struct Run {
    success: bool,
    output: String,
}

impl Run {
    /// `(sent, received)` from its summary line.
    fn totals(&self) -> Option<(u64, u64)> {
        let line = self
            .output
            .lines()
            .rev()
            .find(|l| l.contains("start_mclient: tot_send_msgs="))?;
        let number = |key: &str| -> Option<u64> {
            let rest = line.split(key).nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        Some((number("tot_send_msgs=")?, number("tot_recv_msgs=")?))
    }

    fn lost_nothing(&self) -> bool {
        self.output.contains("Total lost packets 0 (")
    }
}

async fn uclient(args: &[&str]) -> Run {
    let program = tool("turnutils_uclient").expect("checked by the caller");
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("turnutils_uclient finishes within 2 minutes")
        .expect("turnutils_uclient runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Run {
        success: output.status.success(),
        output: text,
    }
}

/// An echo peer (`turnutils_peer`) on a free loopback port.
struct EchoPeer {
    port: u16,
    _child: tokio::process::Child,
}

async fn echo_peer() -> EchoPeer {
    let program = tool("turnutils_peer").expect("checked by the caller");
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let child = tokio::process::Command::new(program)
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("turnutils_peer starts");
    // Wait until it answers: a datagram to an echo server comes back.
    let probe = UdpSocket::bind("127.0.0.1:0").expect("probe socket");
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    for _ in 0..100 {
        let _ = probe.send_to(b"ping", ("127.0.0.1", port));
        if probe.recv_from(&mut buf).is_ok() {
            return EchoPeer { port, _child: child };
        }
    }
    panic!("turnutils_peer did not start");
}

/// A counter from `/metrics`, waiting (bounded) until `ready` accepts it: the
/// relay publishes its counters four times a second.
async fn metric_until(base: &str, series: &str, ready: impl Fn(f64) -> bool) -> f64 {
    let client = reqwest::Client::new();
    let mut last = f64::NAN;
    for _ in 0..100 {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        if let Some(value) = text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        {
            last = value.trim().parse().expect("a number");
            if ready(last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never became ready (last {last})");
}

#[tokio::test]
async fn coturn_client_relays_through_us_over_udp_and_tcp_without_loss() {
    if tool("turnutils_uclient").is_none() || tool("turnutils_peer").is_none() {
        return;
    }
    // 127.0.0.1 allow-listed for the echo peer; client-to-client runs (-y)
    // relay between two of our own allocations, which needs no allow-list.
    let (running, _dir) = start_relay(|c| c.turn.allowed_peer_ip = vec!["127.0.0.1".into()]).await;
    let port = turn_port(&running).to_string();
    let peer = echo_peer().await;
    let peer_port = peer.port.to_string();
    let common = [
        "-n", "100", "-m", "2", "-l", "160", "-z", "2", "-u", "alice", "-W", SECRET, "-p", &port,
    ];
    // (flags, with RTCP allocations: EVEN-PORT with a reservation and its token)
    let runs: [(&[&str], bool); 5] = [
        (&["-y"], false),
        (&["-t", "-y"], false),
        (&["-y"], true),
        (&["-s", "-e", "127.0.0.1", "-r", &peer_port], false),
        (&["-t", "-e", "127.0.0.1", "-r", &peer_port], false),
    ];
    for (flags, rtcp) in runs {
        let mut args: Vec<&str> = flags.to_vec();
        if !rtcp {
            args.push("-c");
        }
        args.extend_from_slice(&common);
        args.push("127.0.0.1");
        let run = uclient(&args).await;
        assert!(run.success, "uclient {args:?} failed:\n{}", run.output);
        assert!(run.lost_nothing(), "uclient {args:?} lost packets:\n{}", run.output);
        let messages = if rtcp { 400 } else { 200 };
        assert_eq!(
            run.totals(),
            Some((messages, messages)),
            "uclient {args:?}:\n{}",
            run.output
        );
    }
    let base = format!("http://{}", running.http_addr);
    metric_until(&base, "switchboard_turn_packets_to_peers_total", |v| v >= 1200.0).await;
    metric_until(&base, "switchboard_turn_allocations_total", |v| v >= 12.0).await;
    // The client-to-client runs over UDP went from one of our allocations to the other in-process.
    metric_until(&base, "switchboard_turn_local_relays_total", |v| v >= 200.0).await;
}

#[tokio::test]
async fn coturn_client_with_wrong_credentials_fails() {
    if tool("turnutils_uclient").is_none() {
        return;
    }
    let (running, _dir) = start_relay(|_| {}).await;
    let port = turn_port(&running).to_string();
    let run = uclient(&[
        "-y",
        "-c",
        "-n",
        "5",
        "-u",
        "alice",
        "-W",
        "not-the-secret",
        "-p",
        &port,
        "127.0.0.1",
    ])
    .await;
    assert!(run.output.contains("Cannot complete Allocation"), "{}", run.output);
    assert!(run.totals().is_none(), "no data flowed:\n{}", run.output);
    let base = format!("http://{}", running.http_addr);
    metric_until(
        &base,
        "switchboard_turn_refusals_total{code=\"401\",reason=\"unauthorized\"}",
        |v| v >= 2.0,
    )
    .await;
    metric_until(&base, "switchboard_turn_allocations_total", |v| v == 0.0).await;
}

#[tokio::test]
async fn loopback_peers_are_refused_by_switchboard_turn() {
    if tool("turnutils_uclient").is_none() || tool("turnutils_peer").is_none() {
        return;
    }
    let (running, _dir) = start_relay(|_| {}).await;
    let port = turn_port(&running).to_string();
    let peer = echo_peer().await;
    let run = uclient(&[
        "-c",
        "-n",
        "5",
        "-u",
        "alice",
        "-W",
        SECRET,
        "-e",
        "127.0.0.1",
        "-r",
        &peer.port.to_string(),
        "-p",
        &port,
        "127.0.0.1",
    ])
    .await;
    assert!(
        run.output.contains("403"),
        "the channel bind is refused:\n{}",
        run.output
    );
    let base = format!("http://{}", running.http_addr);
    metric_until(
        &base,
        "switchboard_turn_refusals_total{code=\"403\",reason=\"forbidden\"}",
        |v| v >= 1.0,
    )
    .await;
    metric_until(&base, "switchboard_turn_packets_to_peers_total", |v| v == 0.0).await;
}

#[tokio::test]
async fn credentials_from_voip_turn_server_authenticate_all_in_one() {
    if tool("turnutils_uclient").is_none() || tool("turnutils_peer").is_none() {
        return;
    }
    let server = TestServer::start_with(|c| {
        c.turn.enabled = true;
        c.turn.static_auth_secret = SECRET.into();
    })
    .await;
    let alice = server.user("alice").await;
    let (status, body) = alice.get("/voip/turnServer").await;
    assert_eq!(status, 200, "{body}");
    let port = server.running.turn.as_ref().expect("relay runs").udp_addr.port();
    assert_eq!(
        body["uris"],
        serde_json::json!([
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp"),
        ])
    );
    // All-in-one on localhost allows loopback peers: everything there is local.
    let peer = echo_peer().await;
    for tcp in [false, true] {
        relays_with_rest_credentials(&body, port, peer.port, tcp).await;
    }
}

/// coturn's client, with the REST credentials of a `/voip/turnServer` answer,
/// relays 2 × 50 messages through the relay on `port` to the echo peer on
/// `peer_port` (over TCP if `tcp`) and back, losing none.
async fn relays_with_rest_credentials(turn_server: &serde_json::Value, port: u16, peer_port: u16, tcp: bool) {
    let username = turn_server["username"].as_str().expect("username");
    let password = turn_server["password"].as_str().expect("password");
    let (port, peer_port) = (port.to_string(), peer_port.to_string());
    let mut args = vec![
        "-c",
        "-n",
        "50",
        "-m",
        "2",
        "-u",
        username,
        "-w",
        password,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
        "-p",
        &port,
        "127.0.0.1",
    ];
    if tcp {
        args.insert(0, "-t");
    }
    let run = uclient(&args).await;
    assert!(run.lost_nothing(), "{}", run.output);
    assert_eq!(run.totals(), Some((100, 100)), "{}", run.output);
}

/// Credentials Synapse mints from its `turn_shared_secret` (its
/// `/voip/turnServer`) authenticate at `switchboard turn` run with the same
/// secret: coturn's client relays with them.
#[tokio::test]
async fn credentials_from_synapse_authenticate_at_switchboard_turn() {
    if tool("turnutils_uclient").is_none() || tool("turnutils_peer").is_none() {
        return;
    }
    let (running, _dir) = start_relay(|c| c.turn.allowed_peer_ip = vec!["127.0.0.1".into()]).await;
    let port = turn_port(&running);
    let uri = format!("turn:127.0.0.1:{port}?transport=udp");
    let synapse = Synapse::start_with(&format!("turn_shared_secret: \"{SECRET}\"\nturn_uris: [\"{uri}\"]\n")).await;
    let mut alice = Client::new(&synapse.base);
    alice.register("alice", "correct horse").await;
    let (status, body) = alice.get("/voip/turnServer").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["uris"], serde_json::json!([uri]));
    let username = body["username"].as_str().expect("username");
    assert!(
        username.ends_with(":@alice:synapse.test"),
        "Synapse's REST username: {username}"
    );
    let peer = echo_peer().await;
    relays_with_rest_credentials(&body, port, peer.port, false).await;
}

/// A small TURN client over real UDP, built on our codec.
struct MiniClient {
    socket: UdpSocket,
    server: SocketAddr,
    username: String,
    key: [u8; 16],
    nonce: String,
    tid: u8,
}

impl MiniClient {
    fn new(server: SocketAddr, user: &str, expiry_offset: i64) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let expiry = now.saturating_add_signed(expiry_offset);
        let secret = SharedSecret::new(SECRET);
        let username = format!("{expiry}:{user}");
        let password = secret.password_for(&username);
        let key = long_term_key(&username, REALM, &password);
        Self {
            socket,
            server,
            username,
            key,
            nonce: String::new(),
            tid: 0,
        }
    }

    fn writer(&mut self, method: u16, class: Class) -> MessageWriter {
        self.tid += 1;
        MessageWriter::new(method, class, TransactionId([self.tid; 12]))
    }

    fn send(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).expect("send");
    }

    fn receive(&self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (len, _) = self.socket.recv_from(&mut buf).expect("a response in time");
        buf[..len].to_vec()
    }

    /// Sends a request (signed once a nonce is known) and returns the error code, if any.
    fn request(&mut self, method: u16, attrs: impl Fn(&mut MessageWriter)) -> Option<u16> {
        for _ in 0..2 {
            let mut writer = self.writer(method, Class::Request);
            attrs(&mut writer);
            if !self.nonce.is_empty() {
                writer
                    .attr(attr::USERNAME, self.username.as_bytes())
                    .attr(attr::REALM, REALM.as_bytes())
                    .attr(attr::NONCE, self.nonce.as_bytes())
                    .integrity(&self.key);
            }
            self.send(&writer.finish());
            let response = self.receive();
            let message = Message::parse(&response).expect("a STUN response");
            let code = message
                .get(attr::ERROR_CODE)
                .map(|v| u16::from(v[2]) * 100 + u16::from(v[3]));
            if code == Some(401) && self.nonce.is_empty() {
                self.nonce = message.text(attr::NONCE).expect("nonce").expect("text").into();
                continue;
            }
            return code;
        }
        Some(401)
    }

    fn allocate(&mut self) -> Option<u16> {
        self.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }
}

#[tokio::test]
async fn refusals_and_garbage_over_real_sockets() {
    let (running, _dir) = start_relay(|c| c.turn.user_quota = 1).await;
    let turn = running.turn.as_ref().expect("relay runs");
    let server = turn.udp_addr;
    let base = format!("http://{}", running.http_addr);

    // An expired REST username: 401.
    let mut expired = MiniClient::new(server, "@old:example.org", -10);
    assert_eq!(expired.allocate(), Some(401));
    // The quota of one allocation per user.
    let mut first = MiniClient::new(server, "@q:example.org", 600);
    assert_eq!(first.allocate(), None);
    let mut second = MiniClient::new(server, "@q:example.org", 600);
    assert_eq!(second.allocate(), Some(486));
    // Peers in private ranges and the relay's own ports: 403.
    for peer in ["10.0.0.1:9", "192.168.0.1:9", "169.254.169.254:80", "127.0.0.1:9"] {
        let peer: SocketAddr = peer.parse().expect("addr");
        let code = first.request(method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(code, Some(403), "{peer}");
    }
    let code = first.request(method::CHANNEL_BIND, |w| {
        w.u32_attr(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, server);
    });
    assert_eq!(code, Some(403), "the relay's own listener");

    // Garbage, truncated STUN, truncated ChannelData, ChannelData on an unbound channel.
    let mut binding = first.writer(method::BINDING, Class::Request);
    binding.attr(attr::SOFTWARE, b"test");
    let binding = binding.finish();
    let garbage: [&[u8]; 5] = [
        &[0xFF; 40],
        &binding[..binding.len() - 3],
        &binding[..10],
        &[0x40, 0x00, 0x00, 0x40, 1, 2, 3],
        &[0x40, 0x00],
    ];
    for bytes in garbage {
        first.send(bytes);
    }
    first.send(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
    // The relay still answers, in order, after all of that.
    first.send(&binding);
    let answer = first.receive();
    let answer = Message::parse(&answer).expect("a Binding response");
    assert_eq!(answer.class(), Class::Success);
    assert_eq!(
        answer.xor_address(attr::XOR_MAPPED_ADDRESS),
        Some(Ok(first.socket.local_addr().expect("addr")))
    );
    metric_until(&base, "switchboard_turn_drops_total{reason=\"malformed\"}", |v| {
        v == 5.0
    })
    .await;
    metric_until(&base, "switchboard_turn_drops_total{reason=\"unbound_channel\"}", |v| {
        v == 1.0
    })
    .await;
    metric_until(
        &base,
        "switchboard_turn_refusals_total{code=\"486\",reason=\"allocation_quota_reached\"}",
        |v| v == 1.0,
    )
    .await;

    // TCP: a stream that is not TURN is closed.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(turn.tcp_addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(&[0xC0; 64]).expect("write");
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).expect("closed, not timed out"), 0);
}

#[tokio::test]
async fn coturn_client_relays_over_tls() {
    if tool("turnutils_uclient").is_none() {
        return;
    }
    let openssl = tool("openssl").expect("openssl is installed (scripts/test.sh installs it)");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = std::process::Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());
    let (running, _dir) = start_relay(|c| {
        c.turn.cert = cert.display().to_string();
        c.turn.pkey = key.display().to_string();
        c.turn.tls_listening_port = 0;
    })
    .await;
    let tls = running.turn.as_ref().and_then(|t| t.tls_addr).expect("TLS listener");
    assert!(
        running
            .turn_uris
            .contains(&format!("turns:127.0.0.1:{}?transport=tcp", tls.port())),
        "{:?}",
        running.turn_uris
    );
    let port = tls.port().to_string();
    let run = uclient(&[
        "-S",
        "-t",
        "-y",
        "-c",
        "-n",
        "50",
        "-m",
        "2",
        "-u",
        "alice",
        "-W",
        SECRET,
        "-p",
        &port,
        "127.0.0.1",
    ])
    .await;
    assert!(run.success, "{}", run.output);
    assert!(run.lost_nothing(), "{}", run.output);
    assert_eq!(run.totals(), Some((100, 100)), "{}", run.output);
}
