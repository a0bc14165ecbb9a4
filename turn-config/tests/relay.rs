//! The relay core in virtual time: clients are byte builders, the "driver"
//! hands out relay ports, nothing touches a socket or the clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switchboard_turn_config::policy::PeerPolicy;
use switchboard_turn_config::relay::{
    AllocationId, ClientAddr, ClientOutcome, Command, DropReason, PEER_HEADROOM, PEER_TAILROOM, Refusal, Relay,
    RelayConfig, Transport,
};
use switchboard_turn_config::rest::{SharedSecret, long_term_key};
use switchboard_turn_config::stun::{self, Class, Message, MessageWriter, TransactionId, attr, method};

const REALM: &str = "example.org";
const UNIX_START: u64 = 1_767_225_600;
const RELAY_IP: &str = "203.0.113.1";

struct Sim {
    relay: Relay,
    now: Instant,
    next_port: u16,
    secret: SharedSecret,
    tid: u64,
}

struct Client {
    addr: ClientAddr,
    username: String,
    key: [u8; 16],
    nonce: String,
    relayed: Option<SocketAddr>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

impl Sim {
    fn new(tweak: impl FnOnce(&mut RelayConfig)) -> Self {
        let secret = SharedSecret::new("n0t-a-real-secret");
        let mut config = RelayConfig::new(REALM, secret.clone(), [9; 32]);
        tweak(&mut config);
        let now = Instant::now();
        Self {
            relay: Relay::new(config, now, UNIX_START),
            now,
            next_port: 50_000,
            secret,
            tid: 0,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut id = [0u8; 12];
        id[4..].copy_from_slice(&self.tid.to_be_bytes());
        TransactionId(id)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.relay.handle_timeout(self.now);
    }

    /// Plays the driver: binds relay ports on RELAY_IP (or `ip`), collects releases.
    fn run_commands(&mut self, ip: &str) -> Vec<u16> {
        let mut released = Vec::new();
        while let Some(command) = self.relay.poll_command() {
            match command {
                Command::BindRelay {
                    allocation,
                    reserve_next,
                    ..
                } => {
                    let port = self.next_port;
                    self.next_port += 2;
                    let relayed = SocketAddr::new(ip.parse().expect("ip"), port);
                    if reserve_next {
                        self.relay
                            .handle_relay_reserved(allocation, SocketAddr::new(relayed.ip(), port + 1));
                    }
                    self.relay.handle_relay_bound(self.now, allocation, Some(relayed));
                }
                Command::ReleaseRelay { relay_port, .. } => released.push(relay_port),
            }
        }
        released
    }

    fn responses(&mut self) -> Vec<(ClientAddr, Vec<u8>)> {
        std::iter::from_fn(|| self.relay.poll_transmit())
            .map(|t| (t.to, t.contents))
            .collect()
    }

    /// Sends `bytes` from `client`, expects exactly one STUN response, returns it.
    fn exchange(&mut self, client: ClientAddr, bytes: &[u8], ip: &str) -> Vec<u8> {
        assert_eq!(
            self.relay.handle_client_packet(self.now, client, bytes),
            ClientOutcome::Handled
        );
        self.run_commands(ip);
        let mut responses = self.responses();
        assert_eq!(responses.len(), 1, "one response");
        let (to, bytes) = responses.remove(0);
        assert_eq!(to, client);
        bytes
    }

    fn client(&self, transport: Transport, address: &str, user: &str, ttl: u64) -> Client {
        let creds = self.secret.mint(user, UNIX_START, ttl);
        let key = long_term_key(&creds.username, REALM, &creds.password);
        Client {
            addr: ClientAddr {
                transport,
                addr: addr(address),
            },
            username: creds.username,
            key,
            nonce: String::new(),
            relayed: None,
        }
    }

    /// A signed request from `client`; `attrs` adds the method's attributes.
    fn request(&mut self, client: &Client, method: u16, attrs: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        let tid = self.tid();
        let mut writer = MessageWriter::new(method, Class::Request, tid);
        attrs(&mut writer);
        writer
            .attr(attr::USERNAME, client.username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, client.nonce.as_bytes())
            .integrity(&client.key)
            .fingerprint();
        writer.finish()
    }

    /// Unauthenticated Allocate (401, take the nonce), then the real one.
    fn allocate(&mut self, client: &mut Client, ip: &str) -> Result<SocketAddr, u16> {
        let tid = self.tid();
        let mut writer = MessageWriter::new(method::ALLOCATE, Class::Request, tid);
        writer.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let challenge = self.exchange(client.addr, &writer.finish(), ip);
        let challenge = Message::parse(&challenge).expect("response parses");
        assert_eq!(error_code(&challenge), Some(401));
        assert_eq!(challenge.text(attr::REALM), Some(Ok(REALM)));
        client.nonce = challenge.text(attr::NONCE).expect("nonce").expect("utf-8").to_string();
        let request = self.request(client, method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        let response = self.exchange(client.addr, &request, ip);
        let response = Message::parse(&response).expect("response parses");
        if let Some(code) = error_code(&response) {
            return Err(code);
        }
        assert!(response.verify_integrity(&client.key), "the success is signed");
        assert_eq!(
            response.xor_address(attr::XOR_MAPPED_ADDRESS),
            Some(Ok(client.addr.addr))
        );
        let relayed = response
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .expect("relayed")
            .expect("valid");
        client.relayed = Some(relayed);
        Ok(relayed)
    }

    /// A signed request expecting success (`Ok`) or an error code.
    fn signed(&mut self, client: &Client, method: u16, attrs: impl FnOnce(&mut MessageWriter)) -> Result<(), u16> {
        let request = self.request(client, method, attrs);
        let response = self.exchange(client.addr, &request, RELAY_IP);
        let response = Message::parse(&response).expect("response parses");
        match error_code(&response) {
            Some(code) => Err(code),
            None => {
                assert!(response.verify_integrity(&client.key));
                Ok(())
            }
        }
    }

    fn permit(&mut self, client: &Client, peer: SocketAddr) -> Result<(), u16> {
        self.signed(client, method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    fn bind(&mut self, client: &Client, channel: u16, peer: SocketAddr) -> Result<(), u16> {
        self.signed(client, method::CHANNEL_BIND, |w| {
            w.u32_attr(attr::CHANNEL_NUMBER, u32::from(channel) << 16)
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    /// What a peer's datagram becomes: the client and the bytes it gets.
    fn peer_sends(&mut self, relay_port: u16, peer: SocketAddr, payload: &[u8]) -> Option<(ClientAddr, Vec<u8>)> {
        let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let range = PEER_HEADROOM..PEER_HEADROOM + payload.len();
        self.relay
            .handle_peer_packet(self.now, relay_port, peer, &mut buf, range)
            .map(|(client, range)| (client, buf[range].to_vec()))
    }
}

fn error_code(message: &Message<'_>) -> Option<u16> {
    if message.class() != Class::Error {
        return None;
    }
    let value = message.get(attr::ERROR_CODE).expect("ERROR-CODE");
    Some(u16::from(value[2]) * 100 + u16::from(value[3]))
}

fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; 4 + payload.len()];
    bytes[4..].copy_from_slice(payload);
    stun::write_channel_data_header(&mut bytes, 4, payload.len(), channel, false).expect("room");
    bytes
}

#[test]
fn two_clients_relay_through_channels_and_indications() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.10:40000", "@alice:example.org", 3600);
    let mut bob = sim.client(Transport::Tcp, "198.51.100.20:40001", "@bob:example.org", 3600);
    let alice_relay = sim.allocate(&mut alice, RELAY_IP).expect("alice allocates");
    let bob_relay = sim.allocate(&mut bob, RELAY_IP).expect("bob allocates");
    assert_ne!(alice_relay, bob_relay);
    assert_eq!(sim.relay.stats().allocations, 2);

    // Alice binds a channel to Bob's relayed address; Bob permits Alice's.
    sim.bind(&alice, 0x4001, bob_relay).expect("channel bound");
    sim.permit(&bob, alice_relay).expect("permission");

    // Alice -> ChannelData -> relayed from her relay port to Bob's relay address.
    let packet = channel_data(0x4001, b"hello bob");
    let ClientOutcome::Forward {
        relay_port,
        peer,
        payload,
    } = sim.relay.handle_client_packet(sim.now, alice.addr, &packet)
    else {
        panic!("ChannelData is forwarded");
    };
    assert_eq!((relay_port, peer), (alice_relay.port(), bob_relay));
    assert_eq!(&packet[payload], b"hello bob");
    // Bob's relayed address is one of ours: the driver may hand it over directly.
    assert_eq!(sim.relay.local_relay(bob_relay), Some(bob_relay.port()));
    assert_eq!(sim.relay.relayed_address(alice_relay.port()), Some(alice_relay));
    assert_eq!(sim.relay.local_relay(addr("192.0.2.1:1000")), None);
    assert_eq!(sim.relay.local_relay(SocketAddr::new(bob_relay.ip(), 1)), None);

    // That datagram arrives on Bob's relay socket: Bob has no channel, so a Data indication.
    let (to, bytes) = sim
        .peer_sends(bob_relay.port(), alice_relay, b"hello bob")
        .expect("delivered to bob");
    assert_eq!(to, bob.addr);
    let data = Message::parse(&bytes).expect("a Data indication");
    assert_eq!((data.method(), data.class()), (method::DATA, Class::Indication));
    assert_eq!(data.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(alice_relay)));
    assert_eq!(data.get(attr::DATA), Some(&b"hello bob"[..]));

    // Bob answers with a Send indication.
    let tid = sim.tid();
    let mut send = MessageWriter::new(method::SEND, Class::Indication, tid);
    send.xor_address(attr::XOR_PEER_ADDRESS, alice_relay)
        .attr(attr::DATA, b"hi alice");
    let send = send.finish();
    let ClientOutcome::Forward { peer, payload, .. } = sim.relay.handle_client_packet(sim.now, bob.addr, &send) else {
        panic!("Send indication is forwarded");
    };
    assert_eq!(peer, alice_relay);
    assert_eq!(&send[payload], b"hi alice");

    // Arriving at Alice's relay from Bob's relay address: Alice has a channel, so ChannelData.
    let (to, bytes) = sim
        .peer_sends(alice_relay.port(), bob_relay, b"hi alice")
        .expect("to alice");
    assert_eq!(to, alice.addr);
    assert_eq!(stun::parse_channel_data(&bytes), Ok((0x4001, 4..12)));

    // Over TCP ChannelData is padded to 4 bytes.
    sim.bind(&bob, 0x4002, alice_relay).expect("bob binds");
    let (_, bytes) = sim.peer_sends(bob_relay.port(), alice_relay, b"12345").expect("to bob");
    assert_eq!(bytes.len(), 12);
    assert_eq!(stun::stream_frame_len(&bytes), Some(12));
    let stats = sim.relay.stats();
    assert_eq!((stats.packets_to_peers, stats.packets_to_clients), (2, 3));
}

#[test]
fn binding_requests_need_no_credentials() {
    let mut sim = Sim::new(|_| {});
    let client = ClientAddr {
        transport: Transport::Udp,
        addr: addr("192.0.2.7:1234"),
    };
    let tid = sim.tid();
    let request = MessageWriter::new(method::BINDING, Class::Request, tid).finish();
    let response = sim.exchange(client, &request, RELAY_IP);
    let response = Message::parse(&response).expect("parses");
    assert_eq!(response.class(), Class::Success);
    assert_eq!(response.xor_address(attr::XOR_MAPPED_ADDRESS), Some(Ok(client.addr)));
}

#[test]
fn credentials_are_checked() {
    let mut sim = Sim::new(|_| {});
    // Wrong password.
    let mut mallory = sim.client(Transport::Udp, "198.51.100.1:1", "@mallory:example.org", 3600);
    mallory.key = long_term_key(&mallory.username, REALM, "guessed");
    assert_eq!(sim.allocate(&mut mallory, RELAY_IP), Err(401));
    // An expired REST username (minted an hour ago with a 60 s lifetime).
    let creds = sim.secret.mint("@old:example.org", UNIX_START - 3600, 60);
    let mut old = sim.client(Transport::Udp, "198.51.100.2:1", "@old:example.org", 60);
    old.key = long_term_key(&creds.username, REALM, &creds.password);
    old.username = creds.username;
    assert_eq!(sim.allocate(&mut old, RELAY_IP), Err(401));
    // A plain username that is not a REST one.
    let mut plain = sim.client(Transport::Udp, "198.51.100.3:1", "x", 3600);
    plain.username = "alice".into();
    assert_eq!(sim.allocate(&mut plain, RELAY_IP), Err(401));
    // The worked example of matrix-voip.md §4 authenticates (its username expires at UNIX_START).
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 0);
    assert_eq!(alice.username, "1767225600:@alice:example.org");
    let hex: String = alice.key.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "ef173ec07358b23a590d6cc92f2fa894");
    assert!(sim.allocate(&mut alice, RELAY_IP).is_ok());
    assert_eq!(sim.relay.stats().refusals(Refusal::Unauthorized), 3 + 4);
}

#[test]
fn stale_nonces_earn_438_and_a_fresh_nonce_works() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 86_400);
    sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    sim.advance(Duration::from_secs(590));
    assert_eq!(sim.signed(&alice, method::REFRESH, |_| {}), Ok(()), "nonce still fresh");
    sim.advance(Duration::from_secs(20));
    let request = sim.request(&alice, method::REFRESH, |_| {});
    let response = sim.exchange(alice.addr, &request, RELAY_IP);
    let response = Message::parse(&response).expect("parses");
    assert_eq!(error_code(&response), Some(438));
    alice.nonce = response.text(attr::NONCE).expect("nonce").expect("utf-8").into();
    assert_eq!(sim.signed(&alice, method::REFRESH, |_| {}), Ok(()));
    // A nonce we never issued is refused as well.
    alice.nonce = "0000000000000000ffffffffffffffff".into();
    assert_eq!(sim.signed(&alice, method::REFRESH, |_| {}), Err(401));
}

#[test]
fn denied_peers_are_refused_but_own_relays_are_not() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    let mut bob = sim.client(Transport::Udp, "198.51.100.5:1", "@bob:example.org", 3600);
    // Relays on loopback, the all-in-one case with the default (denying) policy.
    sim.allocate(&mut alice, "127.0.0.1").expect("allocates");
    let bob_relay = sim.allocate(&mut bob, "127.0.0.1").expect("allocates");
    for peer in [
        "127.0.0.1:22",
        "10.0.0.1:80",
        "192.168.1.1:80",
        "169.254.169.254:80",
        "100.64.0.1:1",
        "0.0.0.0:80",
        "224.0.0.1:9",
        "[::ffff:127.0.0.1]:80",
    ] {
        assert_eq!(sim.permit(&alice, addr(peer)), Err(403), "{peer}");
        assert_eq!(sim.bind(&alice, 0x4000, addr(peer)), Err(403), "{peer}");
    }
    assert_eq!(sim.permit(&alice, bob_relay), Ok(()));
    assert_eq!(sim.permit(&alice, addr("[2001:db8::1]:9")), Err(443));
    assert_eq!(sim.relay.stats().refusals(Refusal::Forbidden), 16);
}

#[test]
fn allow_list_and_service_ports() {
    let mut sim = Sim::new(|config| {
        let mut policy = PeerPolicy::new(&[], &["10.1.0.0/16".parse().expect("range")]);
        policy.add_service(addr("198.51.100.99:3478"));
        config.policy = policy;
    });
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    assert_eq!(sim.permit(&alice, addr("10.1.2.3:9")), Ok(()));
    assert_eq!(sim.permit(&alice, addr("10.2.2.3:9")), Err(403));
    assert_eq!(sim.bind(&alice, 0x4000, addr("198.51.100.99:3478")), Err(403));
    assert_eq!(sim.bind(&alice, 0x4000, addr("198.51.100.99:3479")), Ok(()));
}

#[test]
fn quota_per_user_and_lifetime_zero_frees() {
    let mut sim = Sim::new(|config| config.user_quota = 2);
    let mut clients: Vec<Client> = (0..3)
        .map(|i| {
            sim.client(
                Transport::Udp,
                &format!("198.51.100.9:{}", 1000 + i),
                "@q:example.org",
                3600,
            )
        })
        .collect();
    assert!(sim.allocate(&mut clients[0], RELAY_IP).is_ok());
    assert!(sim.allocate(&mut clients[1], RELAY_IP).is_ok());
    assert_eq!(sim.allocate(&mut clients[2], RELAY_IP), Err(486));
    // Another user is not affected.
    let mut other = sim.client(Transport::Udp, "198.51.100.9:2000", "@other:example.org", 3600);
    assert!(sim.allocate(&mut other, RELAY_IP).is_ok());
    // Refresh with LIFETIME 0 frees one; then the third gets in.
    let released_port = clients[0].relayed.expect("relayed").port();
    let request = sim.request(&clients[0], method::REFRESH, |w| {
        w.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(
        sim.relay.handle_client_packet(sim.now, clients[0].addr, &request),
        ClientOutcome::Handled
    );
    assert_eq!(sim.run_commands(RELAY_IP), vec![released_port]);
    assert_eq!(sim.responses().len(), 1);
    assert!(sim.allocate(&mut clients[2], RELAY_IP).is_ok());
    assert_eq!(sim.relay.stats().refusals(Refusal::AllocationQuotaReached), 1);
}

#[test]
fn mismatches_and_wrong_credentials() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    // A second Allocate (new transaction) on the same 5-tuple: 437.
    let request = sim.request(&alice, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let response = sim.exchange(alice.addr, &request, RELAY_IP);
    assert_eq!(error_code(&Message::parse(&response).expect("parses")), Some(437));
    // Refresh from a client without an allocation: 437.
    let mut bob = sim.client(Transport::Udp, "198.51.100.5:1", "@bob:example.org", 3600);
    bob.nonce = alice.nonce.clone();
    assert_eq!(sim.signed(&bob, method::REFRESH, |_| {}), Err(437));
    // Bob's valid credentials on Alice's 5-tuple: 441.
    let mut impostor = sim.client(Transport::Udp, "198.51.100.4:1", "@bob:example.org", 3600);
    impostor.nonce = alice.nonce.clone();
    assert_eq!(sim.signed(&impostor, method::REFRESH, |_| {}), Err(441));
    // TCP relaying (RFC 6062) is not offered: 442.
    let mut carol = sim.client(Transport::Udp, "198.51.100.6:1", "@carol:example.org", 3600);
    carol.nonce = alice.nonce.clone();
    assert_eq!(
        sim.signed(&carol, method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
        }),
        Err(442)
    );
    // An unknown comprehension-required attribute: 420.
    assert_eq!(
        sim.signed(&carol, method::ALLOCATE, |w| {
            w.attr(0x7777, b"?");
        }),
        Err(420)
    );
    // Channel number rules: out of range, rebinding a number or a peer elsewhere.
    let peer_a = addr("192.0.2.1:1000");
    let peer_b = addr("192.0.2.2:1000");
    assert_eq!(sim.bind(&alice, 0x3FFF, peer_a), Err(400));
    assert_eq!(sim.bind(&alice, 0x4000, peer_a), Ok(()));
    assert_eq!(sim.bind(&alice, 0x4000, peer_a), Ok(()), "a refresh");
    assert_eq!(sim.bind(&alice, 0x4000, peer_b), Err(400));
    assert_eq!(sim.bind(&alice, 0x4001, peer_a), Err(400));
}

#[test]
fn malformed_input_is_counted_and_never_answered() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    let request = sim.request(&alice, method::REFRESH, |_| {});
    let mut inputs: Vec<Vec<u8>> = (0..request.len()).map(|n| request[..n].to_vec()).collect();
    inputs.push(vec![0xFF; 64]);
    inputs.push(channel_data(0x4001, b"payload")[..6].to_vec());
    inputs.push(vec![0x40, 0x01, 0xFF, 0xFF, 1, 2, 3]);
    let mut bad_cookie = request.clone();
    bad_cookie[4] ^= 0xFF;
    inputs.push(bad_cookie);
    for input in &inputs {
        assert_eq!(
            sim.relay.handle_client_packet(sim.now, alice.addr, input),
            ClientOutcome::Handled
        );
    }
    assert!(sim.responses().is_empty());
    // Truncations of length 1..3 fall short of any header too.
    assert_eq!(sim.relay.stats().drops(DropReason::Malformed), inputs.len() as u64);
    // A well-formed ChannelData on a channel never bound.
    assert_eq!(
        sim.relay
            .handle_client_packet(sim.now, alice.addr, &channel_data(0x4005, b"x")),
        ClientOutcome::Handled
    );
    assert_eq!(sim.relay.stats().drops(DropReason::UnboundChannel), 1);
    // ChannelData from a client without an allocation.
    let stranger = ClientAddr {
        transport: Transport::Udp,
        addr: addr("192.0.2.200:5"),
    };
    sim.relay
        .handle_client_packet(sim.now, stranger, &channel_data(0x4000, b"x"));
    assert_eq!(sim.relay.stats().drops(DropReason::NoAllocation), 1);
    // The allocation still works.
    assert_eq!(sim.signed(&alice, method::REFRESH, |_| {}), Ok(()));
}

#[test]
fn permissions_channels_and_allocations_expire() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 86_400);
    let relay = sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    let peer = addr("192.0.2.1:1000");
    sim.permit(&alice, peer).expect("permitted");
    assert!(sim.peer_sends(relay.port(), peer, b"x").is_some());
    // Another port of the same IP is covered by the permission; another IP is not.
    assert!(sim.peer_sends(relay.port(), addr("192.0.2.1:1001"), b"x").is_some());
    assert!(sim.peer_sends(relay.port(), addr("192.0.2.2:1000"), b"x").is_none());
    sim.advance(Duration::from_secs(301));
    assert!(sim.peer_sends(relay.port(), peer, b"x").is_none(), "permission expired");
    assert_eq!(sim.relay.stats().drops(DropReason::NoPermission), 2);
    // The allocation itself lasts its 600 s default lifetime.
    assert!(sim.run_commands(RELAY_IP).is_empty());
    sim.advance(Duration::from_secs(300));
    assert_eq!(sim.run_commands(RELAY_IP), vec![relay.port()]);
    assert_eq!(sim.relay.stats().allocations, 0);
    assert_eq!(sim.relay.poll_timeout(), None);
    assert!(sim.peer_sends(relay.port(), peer, b"x").is_none());
}

#[test]
fn bandwidth_cap_drops_the_excess() {
    let mut sim = Sim::new(|config| config.max_bps = 1000);
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    let relay = sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    let peer = addr("192.0.2.1:1000");
    sim.bind(&alice, 0x4000, peer).expect("bound");
    let packet = channel_data(0x4000, &[0u8; 100]);
    let forwarded = (0..20)
        .filter(|_| {
            matches!(
                sim.relay.handle_client_packet(sim.now, alice.addr, &packet),
                ClientOutcome::Forward { .. }
            )
        })
        .count();
    assert_eq!(forwarded, 10, "one second of burst");
    assert!(sim.peer_sends(relay.port(), peer, &[0u8; 100]).is_none());
    sim.now += Duration::from_millis(500);
    assert!(sim.peer_sends(relay.port(), peer, &[0u8; 100]).is_some());
    assert_eq!(sim.relay.stats().drops(DropReason::BandwidthExceeded), 11);
}

#[test]
fn a_closed_stream_frees_its_allocation_and_a_failed_bind_answers_508() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Tcp, "198.51.100.4:1", "@alice:example.org", 3600);
    let relay = sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    sim.relay.handle_client_closed(alice.addr);
    assert_eq!(sim.run_commands(RELAY_IP), vec![relay.port()]);
    // The driver cannot bind a port: 508.
    let mut bob = sim.client(Transport::Udp, "198.51.100.5:1", "@bob:example.org", 3600);
    bob.nonce = alice.nonce.clone();
    let request = sim.request(&bob, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    sim.relay.handle_client_packet(sim.now, bob.addr, &request);
    let Some(Command::BindRelay { allocation, .. }) = sim.relay.poll_command() else {
        panic!("a bind command");
    };
    assert_eq!(allocation, AllocationId(2));
    sim.relay.handle_relay_bound(sim.now, allocation, None);
    let (_, response) = sim.responses().pop().expect("a response");
    assert_eq!(error_code(&Message::parse(&response).expect("parses")), Some(508));
    assert_eq!(sim.relay.stats().allocations, 0);
}

#[test]
fn mutated_messages_never_panic_nor_harm_the_allocation() {
    let mut sim = Sim::new(|_| {});
    let mut alice = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    let relay = sim.allocate(&mut alice, RELAY_IP).expect("allocates");
    let peer = addr("192.0.2.1:1000");
    sim.bind(&alice, 0x4000, peer).expect("bound");
    let tid = sim.tid();
    let mut send = MessageWriter::new(method::SEND, Class::Indication, tid);
    send.xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, b"payload");
    let seeds = [
        sim.request(&alice, method::REFRESH, |w| {
            w.u32_attr(attr::LIFETIME, 60);
        }),
        sim.request(&alice, method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        }),
        sim.request(&alice, method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        }),
        send.finish(),
        channel_data(0x4000, b"media"),
    ];
    // xorshift64: deterministic, so a failure replays.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut bytes = seeds[(next() % seeds.len() as u64) as usize].clone();
        match next() % 3 {
            0 => bytes.truncate((next() % (bytes.len() as u64 + 1)) as usize),
            1 => bytes.extend((0..next() % 8).map(|_| next() as u8)),
            _ => {}
        }
        for _ in 0..1 + next() % 4 {
            if !bytes.is_empty() {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] ^= 1 << (next() % 8);
            }
        }
        sim.relay.handle_client_packet(sim.now, alice.addr, &bytes);
        sim.run_commands(RELAY_IP);
        sim.responses();
        let _ = sim.peer_sends(relay.port(), peer, &bytes);
    }
    // Only messages intact up to MESSAGE-INTEGRITY are obeyed (what follows it
    // is ignored, RFC 8489 §14.5), and none of these deletes the allocation.
    assert_eq!(sim.signed(&alice, method::REFRESH, |_| {}), Ok(()));
    assert_eq!(sim.relay.stats().allocations, 1);
}

#[test]
fn even_port_reservations_hand_the_next_port_to_the_token() {
    let mut sim = Sim::new(|_| {});
    let mut rtp = sim.client(Transport::Udp, "198.51.100.4:1", "@alice:example.org", 3600);
    sim.allocate(&mut rtp, RELAY_IP).expect("allocates");
    // EVEN-PORT with the R bit: the response carries a RESERVATION-TOKEN.
    let mut rtcp = sim.client(Transport::Udp, "198.51.100.4:2", "@alice:example.org", 3600);
    rtcp.nonce = rtp.nonce.clone();
    let request = sim.request(&rtcp, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80]);
    });
    let response = sim.exchange(rtcp.addr, &request, RELAY_IP);
    let response = Message::parse(&response).expect("parses");
    let relayed = response
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .expect("relayed")
        .expect("valid");
    assert_eq!(relayed.port() % 2, 0);
    let token = response.get(attr::RESERVATION_TOKEN).expect("a token").to_vec();
    // Another 5-tuple allocates with the token: it gets port + 1, no new socket.
    let third = sim.client(Transport::Udp, "198.51.100.4:3", "@alice:example.org", 3600);
    let mut third = third;
    third.nonce = rtp.nonce.clone();
    let request = sim.request(&third, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::RESERVATION_TOKEN, &token);
    });
    sim.relay.handle_client_packet(sim.now, third.addr, &request);
    assert_eq!(sim.relay.poll_command(), None, "the reserved socket is reused");
    let (_, response) = sim.responses().pop().expect("a response");
    let response = Message::parse(&response).expect("parses");
    assert_eq!(
        response.xor_address(attr::XOR_RELAYED_ADDRESS),
        Some(Ok(SocketAddr::new(relayed.ip(), relayed.port() + 1)))
    );
    // A token used once (or never issued) is refused.
    let mut fourth = sim.client(Transport::Udp, "198.51.100.4:4", "@alice:example.org", 3600);
    fourth.nonce = rtp.nonce.clone();
    assert_eq!(
        sim.signed(&fourth, method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &token);
        }),
        Err(508)
    );
    // An unused reservation is released after 30 s.
    let mut fifth = sim.client(Transport::Udp, "198.51.100.4:5", "@alice:example.org", 3600);
    fifth.nonce = rtp.nonce.clone();
    let request = sim.request(&fifth, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80]);
    });
    let response = sim.exchange(fifth.addr, &request, RELAY_IP);
    let relayed = Message::parse(&response)
        .expect("parses")
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .expect("relayed")
        .expect("valid");
    sim.advance(Duration::from_secs(31));
    assert_eq!(sim.run_commands(RELAY_IP), vec![relayed.port() + 1]);
}
