//! The media shard over real UDP on loopback: str0m clients (real ICE,
//! DTLS-SRTP) join a room through the same API the signalling side uses and
//! receive each other's media.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::Peer;
use sfu::{OwnLines, Participant, RoomId, SessionId, SfuEvent};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Event, Input, Output};
use switchboard::drivers::media::{ShardHandle, spawn_shard};
use tokio::sync::{mpsc, oneshot};

/// Where the signalling side sends a client the SFU's offer, and gets its answer.
type OfferRoute = mpsc::Sender<(String, oneshot::Sender<String>)>;
type Routes = Arc<Mutex<HashMap<SessionId, OfferRoute>>>;

/// Packets received per (stream id, kind).
type Tally = Arc<Mutex<HashMap<(String, MediaKind), usize>>>;

struct ClientHandle {
    session: SessionId,
    offers: OfferRoute,
    tally: Tally,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn join(shard: &ShardHandle, name: &str) -> ClientHandle {
    let Peer {
        mut rtc, socket, local, ..
    } = Peer::new().await;
    let mut api = rtc.sdp_api();
    let audio = api.add_media(
        MediaKind::Audio,
        Direction::SendRecv,
        Some(format!("{name}-cam")),
        None,
        None,
    );
    let video = api.add_media(
        MediaKind::Video,
        Direction::SendRecv,
        Some(format!("{name}-cam")),
        None,
        None,
    );
    let (offer, pending) = api.apply().unwrap();
    let participant = Participant {
        user_id: format!("@{name}:localhost"),
        device_id: "DEV".into(),
    };
    let (session, answer) = shard
        .open_session(
            RoomId("!conf:localhost".into()),
            participant,
            offer.to_sdp_string(),
            OwnLines::PublishOnly,
        )
        .await
        .unwrap();
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    let (offers, mut offer_rx) = mpsc::channel::<(String, oneshot::Sender<String>)>(8);
    let (stop, mut stop_rx) = oneshot::channel();
    let tally: Tally = Arc::default();
    let counts = tally.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut seq = (0u64, 0u64);
        let mut next_media = Instant::now();
        loop {
            // Drain the client's output to its next timeout.
            let timeout = loop {
                match rtc.poll_output().unwrap() {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        socket.send_to(&t.contents, t.destination).await.unwrap();
                    }
                    Output::Event(Event::RtpPacket(packet)) => {
                        let mid = rtc.direct_api().stream_rx(&packet.header.ssrc).map(|rx| rx.mid());
                        if let Some(media) = mid.and_then(|mid| rtc.media(mid)) {
                            *counts
                                .lock()
                                .unwrap()
                                .entry((media.stream_id().to_string(), media.kind()))
                                .or_default() += 1;
                        }
                    }
                    Output::Event(_) => {}
                }
            };
            let wake = timeout.min(next_media);
            tokio::select! {
                _ = &mut stop_rx => return,
                received = socket.recv_from(&mut buf) => {
                    let (len, source): (usize, SocketAddr) = received.unwrap();
                    let receive = Receive::new(Protocol::Udp, source, local, &buf[..len]).unwrap();
                    rtc.handle_input(Input::Receive(Instant::now(), receive)).unwrap();
                }
                Some((offer, reply)) = offer_rx.recv() => {
                    let answer = rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer).unwrap()).unwrap();
                    let _ = reply.send(answer.to_sdp_string());
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    rtc.handle_input(Input::Timeout(now)).unwrap();
                    if now >= next_media && rtc.is_connected() {
                        next_media = now + Duration::from_millis(20);
                        let opus = rtc.codec_config().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt());
                        let vp8 = rtc.codec_config().find(|p| p.spec().codec == Codec::Vp8).map(|p| p.pt());
                        let mut api = rtc.direct_api();
                        if let (Some(pt), Some(tx)) = (opus, api.stream_tx_by_mid(audio, None)) {
                            tx.write_rtp(RtpWrite::new(pt, seq.0.into(), (seq.0 * 960) as u32, now, vec![0xfc; 80]));
                            seq.0 += 1;
                        }
                        if let (Some(pt), Some(tx)) = (vp8, api.stream_tx_by_mid(video, None)) {
                            // Every 25th frame a VP8 keyframe, else an interframe.
                            let mut payload = vec![0x10, if seq.1.is_multiple_of(25) { 0x00 } else { 0x01 }];
                            payload.resize(900, 0x55);
                            tx.write_rtp(RtpWrite::new(pt, seq.1.into(), (seq.1 * 1800) as u32, now, payload).marker(true).nackable(true));
                            seq.1 += 1;
                        }
                    } else if !rtc.is_connected() {
                        next_media = now + Duration::from_millis(20);
                    }
                }
            }
        }
    });
    ClientHandle {
        session,
        offers,
        tally,
        stop,
        task,
    }
}

/// Plays the signalling side: on NegotiationNeeded, offer to the client and return its answer.
fn signal(
    shard: ShardHandle,
    mut events: mpsc::UnboundedReceiver<SfuEvent>,
    clients: Routes,
    labels: Arc<Mutex<HashMap<String, String>>>,
) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let SfuEvent::NegotiationNeeded(session) = event else {
                continue;
            };
            let Ok(Some(offer)) = shard.create_offer(session).await else {
                continue;
            };
            for stream in &offer.streams {
                labels
                    .lock()
                    .unwrap()
                    .insert(stream.stream_id.clone(), stream.publisher.user_id.clone());
            }
            let Some(client) = clients.lock().unwrap().get(&session).cloned() else {
                continue;
            };
            let (reply, answer) = oneshot::channel();
            if client.send((offer.sdp, reply)).await.is_err() {
                continue;
            }
            if let Ok(answer) = answer.await {
                shard.accept_answer(session, answer).await.unwrap();
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_receive_each_other_over_udp() {
    let (shard, events) = spawn_shard("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let labels = Arc::new(Mutex::new(HashMap::new()));
    signal(shard.clone(), events, routes.clone(), labels.clone());
    let mut clients = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let client = join(&shard, name).await;
        routes.lock().unwrap().insert(client.session, client.offers.clone());
        clients.push((name, client));
    }
    // Wait (bounded) until everyone receives both others' audio and video.
    let everyone_hears_everyone = || {
        clients.iter().all(|(me, client)| {
            let tally = client.tally.lock().unwrap();
            let labels = labels.lock().unwrap();
            ["alice", "bob", "carol"].iter().filter(|n| *n != me).all(|other| {
                [MediaKind::Audio, MediaKind::Video].iter().all(|kind| {
                    tally.iter().any(|((stream, k), count)| {
                        k == kind
                            && *count >= 25
                            && labels.get(stream).is_some_and(|u| u == &format!("@{other}:localhost"))
                    })
                })
            })
        })
    };
    let mut ok = false;
    for _ in 0..150 {
        if everyone_hears_everyone() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tallies: Vec<_> = clients
        .iter()
        .map(|(n, c)| (n.to_string(), c.tally.lock().unwrap().clone()))
        .collect();
    assert!(ok, "not everyone received everyone within 15 s: {tallies:?}");
    let stats = shard.stats().await.unwrap();
    assert_eq!((stats.sessions, stats.rooms, stats.tracks), (3, 1, 6));
    assert!(stats.packets_forwarded > 100);
    // Every datagram the shard read has its delay (kernel arrival to the end
    // of the turn's sends) in the histogram.
    let delays = stats.forwarding_delay.count();
    assert!(
        delays > 0 && delays <= stats.datagrams_in,
        "{delays} delays for {} datagrams",
        stats.datagrams_in
    );
    assert!(stats.forwarding_delay.quantile(0.99).is_some());
    let session_stats = shard.session_stats(clients[0].1.session).await.unwrap().unwrap();
    assert!(session_stats.packets_out > 50 && session_stats.bytes_in > 0);

    // Hang-ups free the shard's state.
    for (_, client) in clients {
        shard.close_session(client.session).await.unwrap();
        let _ = client.stop.send(());
        let _ = client.task.await;
    }
    let stats = shard.stats().await.unwrap();
    assert_eq!(
        (stats.sessions, stats.rooms, stats.tracks, stats.subscriptions),
        (0, 0, 0, 0)
    );
}
