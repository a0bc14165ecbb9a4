//! The baseline: a plain UDP fan-out forwarder, no crypto, no WebRTC, with the
//! same I/O as a media shard (one thread, one socket, tokio; `recvmmsg` with
//! kernel arrival times, `sendmmsg`), so the difference is the SFU's work.
//!
//! A client announces itself with `JOIN <room>`; every other datagram from it
//! is sent to every other member of its room. `STATS` answers with JSON: the
//! number of datagrams forwarded and the forwarding-delay histogram's counts
//! (kernel arrival to the end of the sends it caused, like the shards').

use anyhow::Result;
use sfu::DelayHistogram;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;
use switchboard::drivers::udp::{self, Datagrams};
use tokio::io::Interest;

#[allow(clippy::print_stdout)]
pub async fn serve() -> Result<()> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    println!("forwarder {}", socket.local_addr()?);
    let mut input = Datagrams::new(&socket)?;
    let mut headers = udp::send_headers();
    let mut rooms: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut room_of: HashMap<SocketAddr, String> = HashMap::new();
    let mut forwarded: u64 = 0;
    let mut delay = DelayHistogram::default();
    // (datagram of the batch, destination): reused, nothing allocated per batch.
    let mut outgoing: Vec<(usize, SocketAddr)> = Vec::new();
    loop {
        socket.readable().await?;
        // Nothing yet (WouldBlock) or an ICMP error for one peer: wait again.
        if socket.try_io(Interest::READABLE, || input.receive(&socket)).is_err() {
            continue;
        }
        outgoing.clear();
        let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        for (i, (data, source, _)) in (0..input.len()).filter_map(|i| Some((i, input.get(i)?))) {
            if let Some(room) = data.strip_prefix(b"JOIN ") {
                let room = String::from_utf8_lossy(room).into_owned();
                rooms.entry(room.clone()).or_default().push(source);
                room_of.insert(source, room);
                continue;
            }
            if data == b"STATS" {
                let stats = serde_json::json!({"forwarded": forwarded, "delay": delay.counts()});
                replies.push((stats.to_string().into_bytes(), source));
                continue;
            }
            let Some(members) = room_of.get(&source).and_then(|room| rooms.get(room)) else {
                continue;
            };
            outgoing.extend(members.iter().filter(|&&m| m != source).map(|&m| (i, m)));
        }
        let skipped = udp::send_all(&socket, &mut headers, &outgoing, |&(i, to)| {
            (input.get(i).map_or(&[][..], |(data, _, _)| data), to)
        })
        .await;
        forwarded += outgoing.len() as u64 - skipped;
        let sent = SystemTime::now();
        for (_, _, arrival) in input.iter() {
            delay.record(sent.duration_since(arrival).unwrap_or_default());
        }
        for (reply, to) in replies {
            socket.send_to(&reply, to).await?;
        }
    }
}
