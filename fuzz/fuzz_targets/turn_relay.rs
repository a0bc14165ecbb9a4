//! Fuzzes everything a TURN client or peer can send: the STUN codec, the
//! ChannelData parser and the relay core behind them. The input is split
//! into packets; each goes to the relay from one of two clients (UDP and TCP)
//! or, for odd-numbered chunks, from a peer to a relay port. Any panic is a
//! bug: malformed input must become a counted drop or a STUN error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use turn_config::relay::{ClientAddr, Command, PEER_HEADROOM, PEER_TAILROOM, Relay, RelayConfig, Transport};
use turn_config::stun::Message;
use turn_config::SharedSecret;

fuzz_target!(|data: &[u8]| {
    // The codec alone.
    if let Ok(message) = Message::parse(data) {
        let _ = message.attributes().count();
        let _ = message.verify_integrity(b"key");
        let _ = message.unknown_required();
    }
    let _ = turn_config::stun::parse_channel_data(data);
    let _ = turn_config::stun::stream_frame_len(data);

    // The relay, fed chunk by chunk (a 0xFF byte separates packets).
    let start = Instant::now();
    let mut relay = Relay::new(RelayConfig::new("fuzz", SharedSecret::new("s"), [1; 32]), start, 1_000_000);
    let clients = [
        ClientAddr { transport: Transport::Udp, addr: SocketAddr::from(([192, 0, 2, 1], 1000)) },
        ClientAddr { transport: Transport::Tcp, addr: SocketAddr::from(([192, 0, 2, 2], 1000)) },
    ];
    let mut buf = vec![0u8; PEER_HEADROOM + 2048 + PEER_TAILROOM];
    for (i, chunk) in data.split(|b| *b == 0xFF).enumerate() {
        let now = start + Duration::from_millis(i as u64 * 700);
        if i % 2 == 1 && chunk.len() <= 2048 {
            buf[PEER_HEADROOM..PEER_HEADROOM + chunk.len()].copy_from_slice(chunk);
            let range = PEER_HEADROOM..PEER_HEADROOM + chunk.len();
            let _ = relay.handle_peer_packet(now, 50_000, SocketAddr::from(([198, 51, 100, 1], 9)), &mut buf, range);
        } else {
            let _ = relay.handle_client_packet(now, clients[i % 2], chunk);
        }
        while let Some(command) = relay.poll_command() {
            if let Command::BindRelay { allocation, .. } = command {
                relay.handle_relay_bound(now, allocation, Some(SocketAddr::from(([203, 0, 113, 1], 50_000))));
            }
        }
        while relay.poll_transmit().is_some() {}
        relay.handle_timeout(now);
    }
});
