//! End to end against the all-in-one server: clients with real HTTP to our
//! homeserver and str0m WebRTC peers (real ICE, DTLS-SRTP on loopback UDP)
//! call the conference bot in one room and receive each other's media.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::{BinaryServer, Client, Peer, Synapse, TestServer, enc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Event, Input, Output};
use switchboard_mixer::analysis::{sine, tone_amplitude};
use switchboard_mixer::codec::{MAX_PACKET_BYTES, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use tokio::sync::{mpsc, oneshot};

const BOT: &str = "@conference:localhost";

/// The bot on `client`'s homeserver (`@conference:<its server name>`).
fn bot_of(client: &Client) -> String {
    let server = client.user_id.split_once(':').map_or("localhost", |(_, server)| server);
    format!("@conference:{server}")
}

/// These tests each run a server, a bot and several WebRTC peers: one at a time,
/// so that on a 2-core machine they do not starve each other's timers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a caller saw: packets per (publisher user id, kind), labels per stream id.
#[derive(Default, Debug)]
struct Seen {
    labels: HashMap<String, String>,
    /// Audio mute state per stream, from the bot's metadata.
    audio_muted: HashMap<String, bool>,
    /// RTP packets received in all.
    total: usize,
    /// Every call event the bot sent for this call: (type, content).
    events: Vec<(String, Value)>,
    by_stream: HashMap<(String, MediaKind), usize>,
    /// What arrived on the caller's own audio m-line, decoded (callers that send a tone).
    heard: Vec<f32>,
}

impl Seen {
    fn packets_of(&self, user: &str, kind: MediaKind) -> usize {
        self.by_stream
            .iter()
            .filter(|((stream, k), _)| *k == kind && self.labels.get(stream).is_some_and(|u| u == user))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Packets of a kind from anyone (a single-stream caller gets unlabelled media).
    fn packets_of_kind(&self, kind: MediaKind) -> usize {
        self.by_stream
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|(_, n)| *n)
            .sum()
    }
}

struct Caller {
    client: Client,
    /// The caller's own msid stream id.
    stream: String,
    seen: Arc<Mutex<Seen>>,
    stop: Option<oneshot::Sender<()>>,
    call_id: String,
}

/// Places a call to the bot in `room` and keeps it running (media both ways,
/// answering the bot's renegotiations) until stopped.
async fn call_bot(client: Client, room: String) -> Caller {
    place_call(client, room, false).await
}

/// Places a call; `v0` makes it a version-0 call (no party, no metadata, no renegotiation).
async fn place_call(client: Client, room: String, v0: bool) -> Caller {
    let call_id = format!("call{}", client.device_id);
    place_call_as(client, room, v0, call_id).await
}

/// The position of `client`'s sync now (take it before anything the bot may answer).
async fn sync_position(client: &Client) -> String {
    client.sync("?timeout=0").await["next_batch"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Places a call with a given `call_id`.
async fn place_call_as(client: Client, room: String, v0: bool, call_id: String) -> Caller {
    place_call_with(client, room, v0, call_id, None, None).await
}

/// Places a call sending a tone of `tone` Hz as real opus; `single_stream`
/// sets the invite's per-call choice.
async fn place_toned_call(client: Client, room: String, v0: bool, tone: f32, single_stream: Option<bool>) -> Caller {
    let call_id = format!("call{}", client.device_id);
    place_call_with(client, room, v0, call_id, Some(tone), single_stream).await
}

async fn place_call_with(
    client: Client,
    room: String,
    v0: bool,
    call_id: String,
    tone: Option<f32>,
    single_stream: Option<bool>,
) -> Caller {
    let mut peer = Peer::new().await;
    peer.tone = tone;
    let stream = format!("{}-cam", client.device_id);
    let mut api = peer.rtc.sdp_api();
    let audio = api.add_media(MediaKind::Audio, Direction::SendRecv, Some(stream.clone()), None, None);
    let video = api.add_media(MediaKind::Video, Direction::SendRecv, Some(stream.clone()), None, None);
    let (offer, pending) = api.apply().unwrap();
    let bot = bot_of(&client);
    let invite = json!({"version": "1", "call_id": call_id, "party_id": client.device_id, "lifetime": 60000,
        "invitee": bot, "offer": {"type": "offer", "sdp": offer.to_sdp_string()},
        "sdp_stream_metadata": {stream.clone(): {"purpose": "m.usermedia"}}});
    let mut invite = if v0 {
        // No party, no metadata; it names the bot, since in a group room only an
        // invite naming the bot reaches it (v0 clients in 1:1 rooms need no invitee).
        json!({"version": 0, "call_id": call_id, "lifetime": 60000, "invitee": bot, "offer": invite["offer"].clone()})
    } else {
        invite
    };
    if let Some(choice) = single_stream {
        invite["io.switchboard.single_stream"] = choice.into();
    }
    // Take the sync position before inviting: the bot may answer at once.
    let since = sync_position(&client).await;
    let (status, body) = client
        .send(&room, "m.call.invite", &format!("inv-{call_id}"), invite)
        .await;
    assert_eq!(status, 200, "{body}");
    run_peer(
        client,
        room,
        call_id,
        peer,
        (audio, video),
        Some(pending),
        since,
        v0,
        stream,
    )
}

/// Waits for the bot's invite in `room` (taking events after `since`) and
/// answers it; returns the call's id and the running peer.
async fn answer_bot(client: Client, room: String, since: String) -> Caller {
    let mut since = since;
    let (call_id, offer) = 'wait: {
        for _ in 0..100 {
            let body = client.sync(&format!("?since={since}&timeout=2000")).await;
            since = body["next_batch"].as_str().unwrap().to_string();
            for event in body["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if event["sender"] == bot_of(&client).as_str() && event["type"] == "m.call.invite" {
                    assert_eq!(event["content"]["invitee"], client.user_id.as_str());
                    let call_id = event["content"]["call_id"].as_str().unwrap().to_string();
                    break 'wait (call_id, event["content"]["offer"]["sdp"].as_str().unwrap().to_string());
                }
            }
        }
        panic!("the bot never called");
    };
    let mut peer = Peer::new().await;
    let answer = peer
        .rtc
        .sdp_api()
        .accept_offer(SdpOffer::from_sdp_string(&offer).unwrap())
        .unwrap();
    let mids: Vec<Mid> = offer
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=mid:"))
        .map(Mid::from)
        .collect();
    let stream = peer.rtc.media(mids[0]).unwrap().stream_id().to_string();
    let content = json!({"version": "1", "call_id": call_id, "party_id": client.device_id,
        "answer": {"type": "answer", "sdp": answer.to_sdp_string()},
        "sdp_stream_metadata": {format!("{}-cam", client.device_id): {"purpose": "m.usermedia"}}});
    let (status, body) = client
        .send(&room, "m.call.answer", &format!("ans-{call_id}"), content)
        .await;
    assert_eq!(status, 200, "{body}");
    run_peer(
        client,
        room,
        call_id,
        peer,
        (mids[0], mids[1]),
        None,
        since,
        false,
        stream,
    )
}

/// Runs a peer in a call until stopped: media both ways, the bot's
/// renegotiations answered, what arrives counted.
#[allow(clippy::too_many_arguments)]
fn run_peer(
    client: Client,
    room: String,
    call_id: String,
    peer: Peer,
    (audio, video): (Mid, Mid),
    pending: Option<SdpPendingOffer>,
    since: String,
    v0: bool,
    stream: String,
) -> Caller {
    let Peer {
        mut rtc,
        socket,
        local,
        tone,
    } = peer;
    // The peer's sync: call events from the bot for this call.
    let (events_tx, mut events) = mpsc::unbounded_channel::<(String, Value)>();
    let syncer = client.clone();
    let (room_, call_id_, bot) = (room.clone(), call_id.clone(), bot_of(&client));
    let sync_task = tokio::spawn(async move {
        let mut since = since;
        loop {
            let (status, body) = syncer.get(&format!("/sync?since={since}&timeout=5000")).await;
            if status != 200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            since = body["next_batch"].as_str().unwrap().to_string();
            for event in body["rooms"]["join"][&room_]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if event["sender"] == bot.as_str() && event["content"]["call_id"] == call_id_.as_str() {
                    let _ = events_tx.send((event["type"].as_str().unwrap().to_string(), event["content"].clone()));
                }
            }
        }
    });

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let seen_ = seen.clone();
    let (stop, mut stop_rx) = oneshot::channel();
    let sender = client.clone();
    let (room_, call_id_) = (room.clone(), call_id.clone());
    tokio::spawn(async move {
        let mut pending = pending;
        let mut buf = vec![0u8; 2048];
        let mut seq = (0u64, 0u64);
        let mut next_media = Instant::now();
        let mut encoder = tone.map(|_| OpusEncoder::new(48_000, 5).unwrap());
        let mut decoder = tone.map(|_| OpusDecoder::new().unwrap());
        let mut txn = 0;
        loop {
            let timeout = loop {
                match rtc.poll_output().unwrap_or_else(|e| panic!("peer (v0: {v0}): {e}")) {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        socket.send_to(&t.contents, t.destination).await.unwrap();
                    }
                    Output::Event(Event::RtpPacket(packet)) => {
                        let mid = rtc.direct_api().stream_rx(&packet.header.ssrc).map(|rx| rx.mid());
                        if let Some(media) = mid.and_then(|mid| rtc.media(mid)) {
                            let key = (media.stream_id().to_string(), media.kind());
                            let mut seen = seen_.lock().unwrap();
                            *seen.by_stream.entry(key).or_default() += 1;
                            seen.total += 1;
                            if let Some(decoder) = decoder.as_mut().filter(|_| mid == Some(audio)) {
                                let mut pcm = vec![0f32; MAX_PACKET_SAMPLES];
                                let n = decoder.decode(&packet.payload, &mut pcm).unwrap();
                                seen.heard.extend_from_slice(&pcm[..n]);
                            }
                        }
                    }
                    Output::Event(_) => {}
                }
            };
            tokio::select! {
                _ = &mut stop_rx => {
                    let hangup = json!({"version": "1", "call_id": call_id_, "party_id": sender.device_id, "reason": "user_hangup"});
                    sender.send(&room_, "m.call.hangup", &format!("hup-{call_id_}"), hangup).await;
                    sync_task.abort();
                    return;
                }
                received = socket.recv_from(&mut buf) => {
                    let (len, source): (usize, SocketAddr) = received.unwrap();
                    if let Ok(receive) = Receive::new(Protocol::Udp, source, local, &buf[..len]) {
                        let _ = rtc.handle_input(Input::Receive(Instant::now(), receive));
                    }
                }
                Some((kind, content)) = events.recv() => {
                    {
                        let mut seen = seen_.lock().unwrap();
                        seen.events.push((kind.clone(), content.clone()));
                        for (stream, entry) in content["sdp_stream_metadata"].as_object().into_iter().flatten() {
                            if let Some(user) = entry["user_id"].as_str() {
                                seen.labels.insert(stream.clone(), user.to_string());
                            }
                            seen.audio_muted.insert(stream.clone(), entry["audio_muted"].as_bool().unwrap_or(false));
                        }
                    }
                    match kind.as_str() {
                        "m.call.answer" => {
                            if let Some(pending) = pending.take() {
                                let answer = SdpAnswer::from_sdp_string(content["answer"]["sdp"].as_str().unwrap()).unwrap();
                                rtc.sdp_api().accept_answer(pending, answer).unwrap();
                                if v0 {
                                    continue;
                                }
                                let select = json!({"version": "1", "call_id": call_id_, "party_id": sender.device_id,
                                    "selected_party_id": content["party_id"]});
                                sender.send(&room_, "m.call.select_answer", &format!("sel-{call_id_}"), select).await;
                            }
                        }
                        "m.call.negotiate" if content["description"]["type"] == "offer" => {
                            let offer = SdpOffer::from_sdp_string(content["description"]["sdp"].as_str().unwrap()).unwrap();
                            let answer = rtc.sdp_api().accept_offer(offer).unwrap();
                            txn += 1;
                            let reply = json!({"version": "1", "call_id": call_id_, "party_id": sender.device_id,
                                "description": {"type": "answer", "sdp": answer.to_sdp_string()}});
                            sender.send(&room_, "m.call.negotiate", &format!("neg-{call_id_}-{txn}"), reply).await;
                        }
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(timeout.min(next_media).into()) => {
                    let now = Instant::now();
                    let _ = rtc.handle_input(Input::Timeout(now));
                    if now >= next_media {
                        next_media = now + Duration::from_millis(20);
                        if rtc.is_connected() {
                            let opus = rtc.codec_config().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt());
                            let vp8 = rtc.codec_config().find(|p| p.spec().codec == Codec::Vp8).map(|p| p.pt());
                            let mut api = rtc.direct_api();
                            if let (Some(pt), Some(tx)) = (opus, api.stream_tx_by_mid(audio, None)) {
                                let payload = match (tone, encoder.as_mut()) {
                                    (Some(freq), Some(encoder)) => {
                                        let mut pcm = vec![0f32; 960];
                                        sine(freq, 0.25, seq.0 * 960, &mut pcm);
                                        let mut out = vec![0u8; MAX_PACKET_BYTES];
                                        let len = encoder.encode(&pcm, &mut out).unwrap();
                                        out.truncate(len);
                                        out
                                    }
                                    _ => vec![0xfc; 80],
                                };
                                tx.write_rtp(RtpWrite::new(pt, seq.0.into(), (seq.0 * 960) as u32, now, payload));
                                seq.0 += 1;
                            }
                            if let (Some(pt), Some(tx)) = (vp8, api.stream_tx_by_mid(video, None)) {
                                // A VP8 keyframe every 10th frame.
                                let mut payload = vec![0x10, if seq.1.is_multiple_of(10) { 0x00 } else { 0x01 }];
                                payload.resize(900, 0x55);
                                tx.write_rtp(RtpWrite::new(pt, seq.1.into(), (seq.1 * 1800) as u32, now, payload).marker(true).nackable(true));
                                seq.1 += 1;
                            }
                        }
                    }
                }
            }
        }
    });
    Caller {
        client,
        stream,
        seen,
        stop: Some(stop),
        call_id,
    }
}

/// Polls `ok` every 100 ms until it holds (at most a minute).
async fn wait_until_async<F: std::future::Future<Output = bool>>(what: &str, mut ok: impl FnMut() -> F) {
    for _ in 0..600 {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    wait_until_async(what, || std::future::ready(ok())).await;
}

/// Four users in one room with the bot: three call it and receive each
/// other, a fourth joins late, one hangs up.
async fn conference(alice: Client, bob: Client, carol: Client, dave: Client) {
    let bot = bot_of(&alice);
    let room = alice
        .create_room(json!({"preset": "private_chat", "invite": [&bob.user_id, &carol.user_id, &dave.user_id, &bot]}))
        .await;
    for client in [&bob, &carol, &dave] {
        assert_eq!(client.join(&room).await.0, 200);
    }
    // The bot joins on its own.
    for _ in 0..300 {
        let (_, members) = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await;
        if members["joined"].get(&bot).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut callers = Vec::new();
    for client in [alice, bob, carol] {
        callers.push(call_bot(client, room.clone()).await);
    }
    let users: Vec<String> = callers.iter().map(|c| c.client.user_id.clone()).collect();
    let hears_all = |callers: &[Caller], min: usize| {
        callers.iter().all(|me| {
            let seen = me.seen.lock().unwrap();
            callers
                .iter()
                .filter(|o| o.client.user_id != me.client.user_id)
                .all(|other| {
                    seen.packets_of(&other.client.user_id, MediaKind::Audio) >= min
                        && seen.packets_of(&other.client.user_id, MediaKind::Video) >= min
                })
        })
    };
    wait_until("each of three callers receives the other two", || {
        hears_all(&callers, 25)
    })
    .await;

    // A fourth joins late: everyone is renegotiated and hears three others.
    callers.push(call_bot(dave, room.clone()).await);
    wait_until("each of four callers receives the other three", || {
        hears_all(&callers, 25)
    })
    .await;

    // One hangs up: the others keep each other and stop receiving the one who left.
    let mut gone = callers.remove(0);
    let _ = gone.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<usize> = callers
        .iter()
        .map(|c| c.seen.lock().unwrap().packets_of(&users[0], MediaKind::Audio))
        .collect();
    let next_of = |i: usize| callers[(i + 1) % callers.len()].client.user_id.clone();
    let others_before: Vec<usize> = (0..callers.len())
        .map(|i| {
            callers[i]
                .seen
                .lock()
                .unwrap()
                .packets_of(&next_of(i), MediaKind::Audio)
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, caller) in callers.iter().enumerate() {
        let seen = caller.seen.lock().unwrap();
        assert_eq!(
            seen.packets_of(&users[0], MediaKind::Audio),
            before[i],
            "{} still receives the caller who hung up",
            caller.client.user_id
        );
        let next = next_of(i);
        assert!(
            seen.packets_of(&next, MediaKind::Audio) > others_before[i] + 50,
            "{} stopped receiving {next}",
            caller.client.user_id
        );
    }
    assert!(gone.call_id.starts_with("call"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_the_bot_receive_each_other() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    conference(
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
        server.user("dave").await,
    )
    .await;
}

/// The same, with the homeserver and the bot as two separate processes: the
/// bot reaches its homeserver only through the Client-Server API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_attached_to_a_separate_homeserver() {
    let _serial = SERIAL.lock().await;
    let hs_dir = tempfile::tempdir().unwrap();
    let homeserver = BinaryServer::start(hs_dir.path(), &["homeserver"]).await;
    let bot_dir = tempfile::tempdir().unwrap();
    let mut bot = spawn_bot(&homeserver.base, bot_dir.path());
    wait_for_bot_user(&homeserver.base, BOT).await;
    conference_of_four(&homeserver.base).await;
    bot.start_kill().unwrap();
}

/// The same against Synapse, the reference homeserver, with its default limit
/// on sending events (lifted for the bot only): the bot registers itself
/// there, joins when invited and bridges four callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_attached_to_synapse() {
    let _serial = SERIAL.lock().await;
    let synapse = Synapse::start().await;
    let bot_dir = tempfile::tempdir().unwrap();
    let mut bot = spawn_bot(&synapse.base, bot_dir.path());
    let bot_id = format!("@conference:{}", Synapse::SERVER_NAME);
    wait_for_bot_user(&synapse.base, &bot_id).await;
    // Synapse's default limit on sending events (0.2 a second after a burst
    // of 10) would hold a bot that answers and renegotiates for everyone: the
    // operator lifts it for the bot (README), as here.
    synapse.exempt_from_rate_limits(&bot_id).await;
    conference_of_four(&synapse.base).await;
    bot.start_kill().unwrap();
}

/// Waits (bounded) until the bot, which registers itself on its first start,
/// exists on the homeserver at `base`.
async fn wait_for_bot_user(base: &str, bot_id: &str) {
    let probe = Client::new(base);
    wait_until_async("the bot registers itself", || async {
        probe.get(&format!("/profile/{}", enc(bot_id))).await.0 == 200
    })
    .await;
}

/// Four users new to the homeserver at `base` call its bot in one room.
async fn conference_of_four(base: &str) {
    let mut users = Vec::new();
    for name in ["alice", "bob", "carol", "dave"] {
        let mut client = Client::new(base);
        client.register(name, "correct horse").await;
        users.push(client);
    }
    let [alice, bob, carol, dave]: [Client; 4] = users.try_into().ok().expect("four users");
    conference(alice, bob, carol, dave).await;
}

/// `switchboard bot` attached to the homeserver at `base`, its state in `dir`.
fn spawn_bot(base: &str, dir: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["bot", "--homeserver", base, "--user", "conference"])
        .args(["--data-dir", dir.to_str().unwrap(), "--bind", "127.0.0.1:0"])
        .env("SWITCHBOARD_BOT_PASSWORD", "a-bot-password")
        .env("SWITCHBOARD_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A restarted bot resumes from its saved sync position and still knows its
/// rooms: a call without `invitee` in a two-member room (which needs the
/// member list) is answered, and a `!record start` given before the restart
/// still records the room's next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_resumes_after_a_restart() {
    let _serial = SERIAL.lock().await;
    let hs_dir = tempfile::tempdir().unwrap();
    let homeserver = BinaryServer::start(hs_dir.path(), &["homeserver"]).await;
    let bot_dir = tempfile::tempdir().unwrap();
    let mut bot = spawn_bot(&homeserver.base, bot_dir.path());
    wait_for_bot_user(&homeserver.base, BOT).await;
    let mut alice = Client::new(&homeserver.base);
    alice.register("alice", "correct horse").await;
    let dm = alice.create_room(json!({"is_direct": true, "invite": [BOT]})).await;
    wait_for_bot(&alice, &dm, "join").await;
    let mut since = sync_position(&alice).await;
    alice.send_text(&dm, "rec-before-restart", "!record start").await;
    wait_for_event(&alice, &dm, &mut since, |e| {
        e["sender"] == BOT
            && e["content"]["body"]
                .as_str()
                .is_some_and(|b| b.contains("Recording will start"))
    })
    .await;
    // Wait until the bot has saved a sync position past its join and the
    // command (positions are `s<N>` on our homeserver), so only relearning can
    // tell it the room's members after the restart, and only its saved list
    // that the room wants recording; then restart it.
    let position = |token: &str| token.trim().trim_start_matches('s').parse::<u64>().ok();
    let joined_at = position(&since).unwrap();
    let saved = bot_dir.path().join("bot_sync_token");
    wait_until_async("the bot saves a position past its join", || async {
        std::fs::read_to_string(&saved)
            .ok()
            .and_then(|t| position(&t))
            .is_some_and(|p| p >= joined_at)
    })
    .await;
    bot.kill().await.unwrap();
    let _bot = spawn_bot(&homeserver.base, bot_dir.path());

    let mut offerer = Peer::new().await;
    let mut api = offerer.rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    let mut since = sync_position(&alice).await;
    let invite = json!({"version": "1", "call_id": "after-restart", "party_id": alice.device_id, "lifetime": 60000,
        "offer": {"type": "offer", "sdp": offer.to_sdp_string()}});
    assert_eq!(alice.send(&dm, "m.call.invite", "restart-1", invite).await.0, 200);
    let mut recording = since.clone();
    let answer = wait_for_event(&alice, &dm, &mut since, |e| {
        e["sender"] == BOT && e["type"] == "m.call.answer"
    })
    .await;
    assert_eq!(answer["content"]["call_id"], "after-restart");
    wait_for_event(&alice, &dm, &mut recording, |e| {
        e["sender"] == BOT
            && e["content"]["body"]
                .as_str()
                .is_some_and(|b| b.starts_with("Recording this conference"))
    })
    .await;
}

/// Alice and Bob in a room Alice made, with the conference bot joined.
async fn alice_and_bob_with_the_bot(server: &TestServer) -> (Client, Client, String) {
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({"invite": ["@bob:localhost", BOT]})).await;
    assert_eq!(bob.join(&room).await.0, 200);
    wait_for_bot(&alice, &room, "join").await;
    (alice, bob, room)
}

/// Alice, Bob and Carol in a room Alice made, with the conference bot joined.
async fn three_with_the_bot(server: &TestServer) -> (Client, Client, Client, String) {
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let room = alice
        .create_room(json!({"invite": ["@bob:localhost", "@carol:localhost", BOT]}))
        .await;
    assert_eq!(bob.join(&room).await.0, 200);
    assert_eq!(carol.join(&room).await.0, 200);
    wait_for_bot(&alice, &room, "join").await;
    (alice, bob, carol, room)
}

async fn membership_of_bot(client: &Client, room: &str) -> Option<String> {
    let (status, body) = client
        .get(&format!("/rooms/{}/state/m.room.member/{}", enc(room), enc(BOT)))
        .await;
    (status == 200).then(|| body["membership"].as_str().unwrap_or_default().to_string())
}

async fn wait_for_bot(client: &Client, room: &str, membership: &str) {
    for _ in 0..100 {
        if membership_of_bot(client, room).await.as_deref() == Some(membership) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the bot's membership never became {membership}");
}

#[tokio::test]
async fn the_bot_serves_allowed_inviters_and_leaves_empty_rooms() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| {
        c.bot.enabled = true;
        c.bot.allowed = vec!["@alice:localhost".into()];
    })
    .await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;

    // Bob is not on the allow-list: his invite is declined.
    let bobs = bob.create_room(json!({"invite": [BOT]})).await;
    wait_for_bot(&bob, &bobs, "leave").await;

    // Alice is: the bot joins, and leaves once everyone else has gone.
    let room = alice.create_room(json!({"invite": [BOT, "@bob:localhost"]})).await;
    wait_for_bot(&alice, &room, "join").await;
    assert_eq!(bob.join(&room).await.0, 200);
    assert_eq!(alice.leave(&room).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        membership_of_bot(&bob, &room).await.as_deref(),
        Some("join"),
        "bob is still there"
    );
    assert_eq!(bob.leave(&room).await.0, 200);
    // Nobody else is left: the bot leaves too (read from the server's store,
    // since no member remains to look).
    let hs = server.running.homeserver.clone().unwrap();
    for _ in 0..100 {
        let (room_, hs_) = (room.clone(), hs.clone());
        let membership = hs_
            .with_store(move |store| Ok(store.membership(&room_, BOT)?))
            .await
            .unwrap();
        if membership.is_some_and(|m| m.membership == homeserver::store::Membership::Leave) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the bot stayed in a room where it was alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_changes_reach_the_other_callers() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, room) = alice_and_bob_with_the_bot(&server).await;
    let a = call_bot(alice, room.clone()).await;
    let b = call_bot(bob, room.clone()).await;
    wait_until("bob receives alice", || {
        b.seen.lock().unwrap().packets_of(&a.client.user_id, MediaKind::Audio) > 10
    })
    .await;
    let muted = |b: &Caller| {
        let seen = b.seen.lock().unwrap();
        seen.labels
            .iter()
            .filter(|(_, user)| **user == a.client.user_id)
            .any(|(stream, _)| seen.audio_muted.get(stream) == Some(&true))
    };
    assert!(!muted(&b));
    let change = json!({"version": "1", "call_id": a.call_id, "party_id": a.client.device_id,
        "sdp_stream_metadata": {a.stream.clone(): {"purpose": "m.usermedia", "audio_muted": true}}});
    let (status, _) = a
        .client
        .send(&room, "m.call.sdp_stream_metadata_changed", "mute-1", change)
        .await;
    assert_eq!(status, 200);
    wait_until("bob learns that alice muted", || muted(&b)).await;
}

#[tokio::test]
async fn an_invite_with_unusable_sdp_is_rejected() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"invite": [BOT]})).await;
    wait_for_bot(&alice, &room, "join").await;
    let mut since = alice.sync("?timeout=0").await["next_batch"]
        .as_str()
        .unwrap()
        .to_string();
    let invite = json!({"version": "1", "call_id": "badsdp", "party_id": alice.device_id, "lifetime": 60000,
        "invitee": BOT, "offer": {"type": "offer", "sdp": "this is not SDP"}});
    assert_eq!(alice.send(&room, "m.call.invite", "bad-1", invite).await.0, 200);
    for _ in 0..50 {
        let body = alice.sync(&format!("?since={since}&timeout=2000")).await;
        since = body["next_batch"].as_str().unwrap().to_string();
        let events = body["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(reject) = events
            .iter()
            .find(|e| e["sender"] == BOT && e["content"]["call_id"] == "badsdp")
        {
            assert_eq!(reject["type"], "m.call.reject");
            return;
        }
    }
    panic!("the bot never rejected the call");
}

/// A version-0 caller (no renegotiation, no metadata) and two v1 callers in one
/// conference: the v0 caller gets the others' audio and video on its own
/// m-lines, and they get its streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_0_caller_joins_a_conference() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, carol, room) = three_with_the_bot(&server).await;
    let old = place_call(alice, room.clone(), true).await;
    let b = call_bot(bob, room.clone()).await;
    let c = call_bot(carol, room.clone()).await;
    let alice_id = old.client.user_id.clone();
    wait_until("the v1 callers receive the v0 caller and each other", || {
        [(&b, &c), (&c, &b)].iter().all(|(me, other)| {
            let seen = me.seen.lock().unwrap();
            [MediaKind::Audio, MediaKind::Video]
                .iter()
                .all(|k| seen.packets_of(&alice_id, *k) >= 25 && seen.packets_of(&other.client.user_id, *k) >= 25)
        })
    })
    .await;
    wait_until("the v0 caller receives audio and video", || {
        let seen = old.seen.lock().unwrap();
        seen.packets_of_kind(MediaKind::Audio) >= 25 && seen.packets_of_kind(MediaKind::Video) >= 25
    })
    .await;
}

/// The amplitude of each frequency in the last second a caller heard on its own audio m-line.
/// (The peers' clocks drift against the mixer's, which conceals a frame now and
/// then: tones in whole cycles per 20 ms frame — multiples of 50 Hz — keep their
/// phase across that, so the analysis sees them whole.)
fn heard(caller: &Caller, freqs: &[f32]) -> Option<Vec<f32>> {
    let seen = caller.seen.lock().unwrap();
    let pcm = &seen.heard;
    if pcm.len() < 48_000 {
        return None;
    }
    let tail = &pcm[pcm.len() - 48_000..];
    Some(freqs.iter().map(|f| tone_amplitude(tail, *f, 48_000.0)).collect())
}

/// A version-0 caller and two multi-stream callers, each sending a tone: the
/// v0 caller hears a mix of the other two (and not itself); the others receive
/// the v0 caller's audio and video and each other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v0_caller_and_two_multi_stream_callers_all_receive_each_other() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, carol, room) = three_with_the_bot(&server).await;
    let freqs = [450.0, 650.0, 1000.0];
    let old = place_toned_call(alice, room.clone(), true, freqs[0], None).await;
    let b = place_toned_call(bob, room.clone(), false, freqs[1], None).await;
    let c = place_toned_call(carol, room.clone(), false, freqs[2], None).await;
    let alice_id = old.client.user_id.clone();
    wait_until("the v1 callers receive the v0 caller and each other", || {
        [(&b, &c), (&c, &b)].iter().all(|(me, other)| {
            let seen = me.seen.lock().unwrap();
            [MediaKind::Audio, MediaKind::Video]
                .iter()
                .all(|k| seen.packets_of(&alice_id, *k) >= 25 && seen.packets_of(&other.client.user_id, *k) >= 25)
        })
    })
    .await;
    wait_until("the v0 caller hears a mix of the other two, not itself", || {
        heard(&old, &freqs).is_some_and(|a| a[0] < 0.02 && a[1] > 0.1 && a[2] > 0.1)
    })
    .await;
    let seen = old.seen.lock().unwrap();
    assert!(
        seen.packets_of_kind(MediaKind::Video) >= 25,
        "the v0 caller sees someone"
    );
    assert!(
        !seen.events.iter().any(|(kind, _)| kind == "m.call.negotiate"),
        "no renegotiation for the v0 caller"
    );
}

/// A version-1 caller that asks for a single stream in its invite gets the
/// mix on its own m-lines and no renegotiation; a `!record start` /
/// `!record stop` in the room leaves an Ogg/Opus file of the conference's
/// audio in the data directory, announced in the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_may_ask_for_a_single_stream_and_the_room_can_be_recorded() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, room) = alice_and_bob_with_the_bot(&server).await;
    let mut since = sync_position(&bob).await;
    bob.send_text(&room, "rec-1", "!record start").await;
    wait_for_event(&bob, &room, &mut since, |e| {
        e["sender"] == BOT
            && e["content"]["body"]
                .as_str()
                .is_some_and(|b| b.contains("Recording will start"))
    })
    .await;
    let freqs = [500.0, 800.0];
    let a = place_toned_call(alice, room.clone(), false, freqs[0], Some(true)).await;
    let b = place_toned_call(bob.clone(), room.clone(), false, freqs[1], None).await;
    let announced = wait_for_event(&bob, &room, &mut since, |e| {
        e["sender"] == BOT
            && e["content"]["body"]
                .as_str()
                .is_some_and(|b| b.contains("Recording this"))
    })
    .await;
    let name = announced["content"]["body"].as_str().unwrap();
    let name = name.split(" to ").nth(1).unwrap().trim_end_matches('.').to_string();
    wait_until("alice (single stream by choice) hears bob", || {
        heard(&a, &freqs).is_some_and(|h| h[0] < 0.02 && h[1] > 0.1)
    })
    .await;
    wait_until("bob receives alice", || {
        b.seen.lock().unwrap().packets_of(&a.client.user_id, MediaKind::Audio) >= 50
    })
    .await;
    assert!(
        !a.seen
            .lock()
            .unwrap()
            .events
            .iter()
            .any(|(kind, _)| kind == "m.call.negotiate"),
        "no renegotiation for a single-stream caller"
    );
    bob.send_text(&room, "rec-2", "!record stop").await;
    wait_for_event(&bob, &room, &mut since, |e| {
        e["sender"] == BOT
            && e["content"]["body"]
                .as_str()
                .is_some_and(|b| b.starts_with("Recording saved"))
    })
    .await;
    let bytes = std::fs::read(server.data_dir.path().join(&name)).unwrap();
    let stream = switchboard_mixer::ogg::read(&bytes).expect("a valid Ogg/Opus file");
    assert!(stream.ended);
    let mut decoder = OpusDecoder::new().unwrap();
    let mut pcm = Vec::new();
    let mut out = vec![0f32; MAX_PACKET_SAMPLES];
    for packet in &stream.packets {
        let n = decoder.decode(packet, &mut out).unwrap();
        pcm.extend_from_slice(&out[..n]);
    }
    let duration = (stream.final_granule - u64::from(stream.pre_skip)) as f64 / 48_000.0;
    assert!(duration > 1.0, "recorded {duration} s");
    assert!((pcm.len() as f64 / 48_000.0 - duration).abs() < 0.05);
    let tail = &pcm[pcm.len() - 24_000..];
    for f in freqs {
        assert!(tone_amplitude(tail, f, 48_000.0) > 0.1, "{f} Hz in the recording");
    }
}

/// A room whose `io.switchboard.conference` state says `single_stream`: a
/// version-1 caller that says nothing gets the mix (no renegotiation); one that
/// asks for multi-stream in its invite gets the others' streams, labelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_setting_makes_callers_single_stream_unless_they_choose() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, room) = alice_and_bob_with_the_bot(&server).await;
    let (status, body) = alice
        .put(
            &format!("/rooms/{}/state/io.switchboard.conference/", enc(&room)),
            json!({"mode": "single_stream"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let freqs = [500.0, 850.0];
    let a = place_toned_call(alice, room.clone(), false, freqs[0], Some(false)).await;
    let b = place_toned_call(bob, room.clone(), false, freqs[1], None).await;
    wait_until("bob (single stream by the room) hears alice mixed", || {
        heard(&b, &freqs).is_some_and(|h| h[0] > 0.1 && h[1] < 0.02)
    })
    .await;
    wait_until("alice (multi-stream by choice) receives bob's labelled streams", || {
        let seen = a.seen.lock().unwrap();
        seen.packets_of(&b.client.user_id, MediaKind::Audio) >= 25
    })
    .await;
    assert!(
        !b.seen
            .lock()
            .unwrap()
            .events
            .iter()
            .any(|(kind, _)| kind == "m.call.negotiate"),
        "no renegotiation for a single-stream caller"
    );
}

/// Syncs `client` from `since` until an event in `room` matches `want`;
/// returns it and the new sync position.
async fn wait_for_event(client: &Client, room: &str, since: &mut String, want: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let body = client.sync(&format!("?since={since}&timeout=2000")).await;
        *since = body["next_batch"].as_str().unwrap().to_string();
        for event in body["rooms"]["join"][room]["timeline"]["events"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if want(event) {
                return event.clone();
            }
        }
    }
    panic!("no matching event arrived in {room}");
}

/// `!dialin` in the group room: the bot opens a direct room with the user,
/// calls them there once they join, and the call is part of the group's
/// conference. Returns the direct room and the sync position before the
/// bot's invite.
async fn dial_in(client: &Client, group: &str) -> (String, String) {
    let mut since = sync_position(client).await;
    client.send_text(group, "dialin-1", "!dialin").await;
    let mut dm = None;
    for _ in 0..100 {
        let body = client.sync(&format!("?since={since}&timeout=2000")).await;
        since = body["next_batch"].as_str().unwrap().to_string();
        if let Some(room) = body["rooms"]["invite"]
            .as_object()
            .and_then(|r| r.keys().next().cloned())
        {
            dm = Some(room);
            break;
        }
    }
    let dm = dm.expect("the bot invites the user to a dial-in room");
    let since = sync_position(client).await;
    assert_eq!(client.join(&dm).await.0, 200);
    (dm, since)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_brings_a_one_to_one_caller_into_the_conference() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, group) = alice_and_bob_with_the_bot(&server).await;
    let b = call_bot(bob, group.clone()).await;

    let (dm, since) = dial_in(&alice, &group).await;
    let (_, members) = alice.get(&format!("/rooms/{}/joined_members", enc(&dm))).await;
    assert_eq!(
        members["joined"].as_object().map(|m| m.len()),
        Some(2),
        "a two-member room, where Element Web places legacy calls"
    );
    let a = answer_bot(alice, dm.clone(), since).await;
    let alice_id = a.client.user_id.clone();
    wait_until("the dialled-in user and the group caller receive each other", || {
        let (sa, sb) = (a.seen.lock().unwrap(), b.seen.lock().unwrap());
        [MediaKind::Audio, MediaKind::Video]
            .iter()
            .all(|k| sa.packets_of(&b.client.user_id, *k) >= 25 && sb.packets_of(&alice_id, *k) >= 25)
    })
    .await;
    let seen = a.seen.lock().unwrap();
    assert!(
        seen.events.iter().any(|(kind, _)| kind == "m.call.select_answer"),
        "the bot selected alice's answer"
    );
}

/// Glare in a dial-in room: both call each other. The smaller call_id wins:
/// a larger invite of the user's is hung up as `replaced`; a smaller one
/// replaces the bot's call and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glare_keeps_the_smaller_call_id() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let (alice, bob, group) = alice_and_bob_with_the_bot(&server).await;
    let b = call_bot(bob, group.clone()).await;
    let (dm, mut since) = dial_in(&alice, &group).await;
    let bots = wait_for_event(&alice, &dm, &mut since, |e| {
        e["sender"] == BOT && e["type"] == "m.call.invite"
    })
    .await;
    let bots_call = bots["content"]["call_id"].as_str().unwrap().to_string();

    // Alice calls too, with a larger call_id: hers gives way.
    let larger = format!("{bots_call}~");
    let invite = json!({"version": "1", "call_id": larger, "party_id": alice.device_id, "lifetime": 60000,
        "invitee": BOT, "offer": bots["content"]["offer"].clone()});
    assert_eq!(alice.send(&dm, "m.call.invite", "glare-1", invite).await.0, 200);
    let hangup = wait_for_event(&alice, &dm, &mut since, |e| {
        e["sender"] == BOT && e["type"] == "m.call.hangup" && e["content"]["call_id"] == larger.as_str()
    })
    .await;
    assert_eq!(hangup["content"]["reason"], "replaced");

    // Then with a smaller one: the bot's call gives way and hers is answered.
    let smaller = bots_call[..bots_call.len() - 1].to_string();
    let a = place_call_as(alice.clone(), dm.clone(), false, smaller.clone()).await;
    let hangup = wait_for_event(&alice, &dm, &mut since, |e| {
        e["sender"] == BOT && e["type"] == "m.call.hangup" && e["content"]["call_id"] == bots_call.as_str()
    })
    .await;
    assert_eq!(hangup["content"]["reason"], "replaced");
    let alice_id = alice.user_id.clone();
    wait_until("alice's own call joins the conference", || {
        let (sa, sb) = (a.seen.lock().unwrap(), b.seen.lock().unwrap());
        sa.packets_of(&b.client.user_id, MediaKind::Audio) >= 25 && sb.packets_of(&alice_id, MediaKind::Audio) >= 25
    })
    .await;
    assert!(smaller < bots_call);
}

/// An invite whose lifetime passed before the bot saw it is never answered;
/// the same invite, still live, is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_invite_is_not_answered() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(|c| c.bot.enabled = true).await;
    let alice = server.user("alice").await;
    let mut offerer = Peer::new().await;
    let mut api = offerer.rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    // Two rooms, each with an invite to the bot sent before the bot is there:
    // one lives 1.5 s, the other a minute. The bot joins both after 2 s.
    let mut rooms = Vec::new();
    for (call_id, lifetime) in [("stale", 1500), ("live", 60000)] {
        let room = alice.create_room(json!({})).await;
        let invite = json!({"version": "1", "call_id": call_id, "party_id": alice.device_id, "lifetime": lifetime,
            "invitee": BOT, "offer": {"type": "offer", "sdp": offer.to_sdp_string()}});
        assert_eq!(alice.send(&room, "m.call.invite", call_id, invite).await.0, 200);
        rooms.push((room, call_id));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut since = sync_position(&alice).await;
    for (room, _) in &rooms {
        assert_eq!(alice.invite(room, BOT).await.0, 200);
    }
    let (live_room, _) = &rooms[1];
    let answer = wait_for_event(&alice, live_room, &mut since, |e| {
        e["sender"] == BOT && e["type"] == "m.call.answer"
    })
    .await;
    assert_eq!(answer["content"]["call_id"], "live", "the live invite is answered");
    // By now the bot has seen both rooms' history: the stale invite got nothing.
    let (stale_room, _) = &rooms[0];
    let (_, messages) = alice
        .get(&format!("/rooms/{}/messages?dir=b&limit=50", enc(stale_room)))
        .await;
    let from_bot: Vec<&Value> = messages["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["sender"] == BOT && e["type"].as_str().is_some_and(|t| t.starts_with("m.call.")))
        .collect();
    assert!(from_bot.is_empty(), "the bot answered an expired invite: {from_bot:?}");
}
