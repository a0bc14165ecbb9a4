//! The baseline: a plain UDP fan-out forwarder, no crypto, no WebRTC, with the
//! same I/O loop shape as a media shard (one thread, one socket, tokio).
//!
//! A client announces itself with `JOIN <room>`; every other datagram from it
//! is sent to every other member of its room. `STATS` answers with the number
//! of datagrams forwarded.

use anyhow::Result;
use std::collections::HashMap;
use std::net::SocketAddr;

#[allow(clippy::print_stdout)]
pub async fn serve() -> Result<()> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    println!("forwarder {}", socket.local_addr()?);
    let mut rooms: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut room_of: HashMap<SocketAddr, String> = HashMap::new();
    let mut forwarded: u64 = 0;
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, source) = socket.recv_from(&mut buf).await?;
        let data = &buf[..len];
        if let Some(room) = data.strip_prefix(b"JOIN ") {
            let room = String::from_utf8_lossy(room).into_owned();
            rooms.entry(room.clone()).or_default().push(source);
            room_of.insert(source, room);
            continue;
        }
        if data == b"STATS" {
            socket.send_to(forwarded.to_string().as_bytes(), source).await?;
            continue;
        }
        let Some(members) = room_of.get(&source).and_then(|room| rooms.get(room)) else {
            continue;
        };
        for &member in members {
            if member == source {
                continue;
            }
            match socket.try_send_to(data, member) {
                Ok(_) => forwarded += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    socket.send_to(data, member).await?;
                    forwarded += 1;
                }
                Err(_) => {}
            }
        }
    }
}
