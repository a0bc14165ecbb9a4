//! A simulated network in virtual time for the SFU core: str0m clients (real
//! ICE, DTLS-SRTP, RTP) and one `Sfu`, exchanging datagrams through a queue
//! with latency and optional deterministic loss. Nothing sleeps; time jumps to
//! the next thing due.
#![allow(dead_code)]

use mixer::codec::{MAX_PACKET_BYTES, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpApi, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, ExtensionValues, RtpWrite, VideoOrientation};
use str0m::stats::MediaEgressStats;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use switchboard_sfu::{OwnLines, Participant, RoomId, SessionId, Sfu, SfuConfig, SfuEvent, StreamInfo};

/// Decides whether a datagram (source, destination, bytes) is lost on the wire.
pub type LossFn = Box<dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> bool>;

pub const LATENCY: Duration = Duration::from_millis(10);
const AUDIO_EVERY: Duration = Duration::from_millis(20);
const VIDEO_EVERY: Duration = Duration::from_millis(33);

struct Datagram {
    at: Instant,
    source: SocketAddr,
    destination: SocketAddr,
    data: Vec<u8>,
}

/// What one client received on one of its m-lines.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub stream_id: String,
    pub kind: Option<MediaKind>,
    /// (extended sequence number, arrival, first payload bytes, payload length) of each RTP packet.
    pub packets: Vec<(u64, Instant, Vec<u8>, usize)>,
    /// (SSRC, RTP timestamp) of each RTP packet, in the same order.
    pub rtp: Vec<(u32, u32)>,
    /// The audio level extension (RFC 6464) of each RTP packet, in the same order.
    pub levels: Vec<Option<i8>>,
    /// The video orientation extension of each RTP packet, in the same order.
    pub orientations: Vec<Option<VideoOrientation>>,
}

pub struct Client {
    pub name: String,
    /// The m-lines of its own offer (audio, video).
    pub own_mids: (Mid, Mid),
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub session: Option<SessionId>,
    next_timeout: Instant,
    audio: Mid,
    video: Mid,
    audio_seq: u64,
    video_seq: u64,
    next_audio: Instant,
    next_video: Instant,
    /// Send a keyframe on the next video tick.
    keyframe_due: bool,
    /// Besides requests, a keyframe every this many frames.
    pub keyframe_every: u64,
    pub sending: bool,
    /// RFC 6464 level of the audio this client sends (-dBov: 0 loud, 127 silent).
    pub audio_level: i8,
    pub received: BTreeMap<Mid, Received>,
    pub keyframe_requests: u64,
    /// Streams the SFU said this client receives (from its last offer).
    pub streams: Vec<StreamInfo>,
    /// The SFU's last renegotiation offer to it.
    pub last_offer: String,
    pub joined_at: Instant,
    /// Sends video as two simulcast layers: "h" (1000-byte packets) and "l" (200-byte packets).
    pub simulcast: bool,
    layer_seq: [u64; 2],
    /// RTP packets per video frame (1,000 bytes each, 30 frames a second).
    pub video_packets_per_frame: u64,
    video_packet_seq: u64,
    /// Sends real opus: a sine of (frequency, amplitude) instead of dummy bytes.
    pub tone: Option<(f32, f32)>,
    encoder: Option<OpusEncoder>,
    /// Sends random bytes of random length as its "opus" instead.
    pub junk_audio: bool,
    /// Decodes what arrives on its own audio m-line into `heard` (48 kHz mono).
    pub listen: bool,
    decoder: Option<OpusDecoder>,
    pub heard: Vec<f32>,
    /// Decodes what arrives on every audio m-line into `ears`.
    pub listen_all: bool,
    pub ears: BTreeMap<Mid, Ear>,
    /// Sends video (when sending at all).
    pub send_video: bool,
    /// Sends nonsense through real SRTP instead of media (see `World::send_chaos`).
    pub chaos: bool,
    chaos_state: u64,
    /// The last statistics of what it sends, per m-line (from the RTCP it
    /// got), with the last fraction lost reported.
    pub egress: BTreeMap<Mid, MediaEgressStats>,
    /// Its bandwidth estimator's estimates (bps), if it runs one.
    pub estimates: Vec<u64>,
}

/// Decoded audio of one m-line, with when each packet's samples arrived.
#[derive(Default)]
pub struct Ear {
    decoder: Option<OpusDecoder>,
    pub pcm: Vec<f32>,
    /// (arrival, index in `pcm` of the packet's first sample).
    pub frames: Vec<(Instant, usize)>,
}

impl Ear {
    fn hear(&mut self, now: Instant, payload: &[u8]) {
        let decoder = self.decoder.get_or_insert_with(|| OpusDecoder::new().expect("decoder"));
        let mut pcm = vec![0f32; MAX_PACKET_SAMPLES];
        if let Ok(n) = decoder.decode(payload, &mut pcm) {
            self.frames.push((now, self.pcm.len()));
            self.pcm.extend_from_slice(&pcm[..n]);
        }
    }

    /// When the first sample louder than `threshold` arrived.
    pub fn onset(&self, threshold: f32) -> Option<Instant> {
        let index = self.pcm.iter().position(|s| s.abs() > threshold)?;
        let frame = self.frames.iter().rev().find(|(_, start)| *start <= index)?;
        Some(frame.0 + Duration::from_secs_f64((index - frame.1) as f64 / 48_000.0))
    }
}

pub struct World {
    pub start: Instant,
    pub now: Instant,
    pub sfu: Sfu,
    pub sfu_addr: SocketAddr,
    pub clients: Vec<Client>,
    wire: VecDeque<Datagram>,
    pub loss: Option<LossFn>,
    pub events: Vec<(Instant, SfuEvent)>,
    pub room: RoomId,
    /// What the next joiner's own m-lines carry from the SFU: nothing, as for
    /// the bot's multi-stream callers, unless a test that makes the joiner
    /// single-stream says both ways.
    pub own_lines: OwnLines,
    /// Wall-clock time spent inside the SFU's calls (for benchmarks).
    pub sfu_busy: Duration,
    /// The SFU's wishes to renegotiate are not acted on (a test makes and
    /// delivers offers itself).
    pub hold_offers: bool,
    /// The next joiners estimate their uplink bandwidth (from transport-wide feedback).
    pub client_bwe: bool,
    /// The next joiners negotiate no mid header extension (their `a=ssrc` lines say
    /// which m-line an SSRC is on).
    pub client_without_mid: bool,
}

fn client_config() -> RtcConfig {
    RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .set_stats_interval(Some(Duration::from_secs(1)))
}

impl World {
    pub fn new() -> Self {
        let start = Instant::now();
        let sfu_addr: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        Self {
            start,
            now: start,
            sfu: Sfu::new(SfuConfig::new(sfu_addr)),
            sfu_addr,
            clients: Vec::new(),
            wire: VecDeque::new(),
            loss: None,
            events: Vec::new(),
            room: RoomId("!room:test".into()),
            own_lines: OwnLines::PublishOnly,
            sfu_busy: Duration::ZERO,
            hold_offers: false,
            client_bwe: false,
            client_without_mid: false,
        }
    }

    /// A client joins the room: its offer has audio and video, send and receive, like a browser's.
    pub fn join(&mut self, name: &str) -> usize {
        self.join_with(name, false)
    }

    /// Joins with `simulcast` video (layers "h" and "l").
    pub fn join_with(&mut self, name: &str, simulcast: bool) -> usize {
        self.join_directed(name, simulcast, Direction::SendRecv, true)
    }

    /// Joins only to receive (its m-lines are receive-only; it publishes nothing).
    pub fn join_receive_only(&mut self, name: &str) -> usize {
        self.join_directed(name, false, Direction::RecvOnly, true)
    }

    /// Joins with an audio m-line alone (a voice call).
    pub fn join_audio_only(&mut self, name: &str) -> usize {
        self.join_directed(name, false, Direction::SendRecv, false)
    }

    fn join_directed(&mut self, name: &str, simulcast: bool, direction: Direction, with_video: bool) -> usize {
        let index = self.clients.len();
        let addr = client_addr(index);
        let config = client_config();
        let config = if self.client_bwe {
            config.enable_bwe(Some(str0m::bwe::Bitrate::kbps(300)))
        } else {
            config
        };
        let config = if self.client_without_mid {
            let mut extensions = ExtensionMap::empty();
            for (id, extension) in ExtensionMap::standard().iter() {
                if *extension != Extension::RtpMid {
                    extensions.set(id, extension.clone());
                }
            }
            config.set_extension_map(extensions)
        } else {
            config
        };
        let mut rtc = config.build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        let mut api = rtc.sdp_api();
        let stream = format!("{name}-cam");
        let audio = api.add_media(MediaKind::Audio, direction, Some(stream.clone()), None, None);
        let layers = simulcast.then(|| {
            let mut layers = Simulcast::new();
            layers.add_send_layer(SimulcastLayer::new("h"));
            layers.add_send_layer(SimulcastLayer::new("l"));
            layers
        });
        let video = if with_video {
            api.add_media(MediaKind::Video, direction, Some(stream), None, layers)
        } else {
            Mid::from("none")
        };
        let (offer, pending) = api.apply().expect("an offer");
        let participant = Participant {
            user_id: format!("@{name}:test"),
            device_id: format!("{name}DEV"),
        };
        let (session, answer) = self
            .sfu
            .open_session(
                self.now,
                self.room.clone(),
                participant,
                &offer.to_sdp_string(),
                self.own_lines,
            )
            .expect("open");
        rtc.sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("answer"))
            .expect("accept");
        let index = self.add_client(name, rtc, addr, session, (audio, video), simulcast);
        self.clients[index].send_video = with_video;
        index
    }

    /// The SFU calls a client (the bot dialling out): the SFU's offer, the
    /// client's answer, and the client sends on the offer's two m-lines.
    pub fn join_called(&mut self, name: &str) -> usize {
        let index = self.clients.len();
        let addr = client_addr(index);
        let participant = Participant {
            user_id: format!("@{name}:test"),
            device_id: format!("{name}DEV"),
        };
        let (session, offer) = self
            .sfu
            .open_offer(self.now, self.room.clone(), participant)
            .expect("the SFU makes an offer");
        let mut rtc = client_config().build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        let answer = rtc
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer).expect("offer parses"))
            .expect("the client accepts the offer");
        let mids: Vec<Mid> = offer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=mid:"))
            .map(Mid::from)
            .collect();
        let [audio, video] = mids[..] else {
            panic!("the SFU offers one audio and one video m-line: {mids:?}")
        };
        self.sfu
            .accept_answer(self.now, session, &answer.to_sdp_string())
            .expect("the SFU accepts the answer");
        self.add_client(name, rtc, addr, session, (audio, video), false)
    }

    fn add_client(
        &mut self,
        name: &str,
        rtc: Rtc,
        addr: SocketAddr,
        session: SessionId,
        (audio, video): (Mid, Mid),
        simulcast: bool,
    ) -> usize {
        let index = self.clients.len();
        self.clients.push(Client {
            name: name.to_string(),
            own_mids: (audio, video),
            rtc,
            addr,
            session: Some(session),
            next_timeout: self.now,
            audio,
            video,
            audio_seq: 0,
            video_seq: 0,
            next_audio: self.now,
            next_video: self.now,
            keyframe_due: true,
            keyframe_every: 90,
            sending: true,
            audio_level: 30,
            received: BTreeMap::new(),
            keyframe_requests: 0,
            streams: Vec::new(),
            joined_at: self.now,
            simulcast,
            layer_seq: [0, 5000],
            video_packets_per_frame: 1,
            video_packet_seq: 0,
            tone: None,
            encoder: None,
            junk_audio: false,
            chaos: false,
            chaos_state: 0x9e37_79b9_7f4a_7c15 ^ index as u64,
            egress: BTreeMap::new(),
            estimates: Vec::new(),
            listen: false,
            decoder: None,
            heard: Vec::new(),
            listen_all: false,
            ears: BTreeMap::new(),
            send_video: true,
            last_offer: String::new(),
        });
        self.drain_client(index);
        self.pump_sfu();
        index
    }

    /// The client hangs up: the SFU closes its session.
    /// The client offers again with its own m-lines both ways, as a browser
    /// does whose transceivers stay `sendrecv` whatever we answered; the SFU
    /// answers and the client takes the answer.
    pub fn reoffer_two_way(&mut self, index: usize) {
        let (audio, video) = self.clients[index].own_mids;
        self.reoffer(index, [(audio, Direction::SendRecv), (video, Direction::SendRecv)]);
    }

    /// The client offers again with these m-lines in these directions (its
    /// view); the SFU answers and the client takes the answer.
    pub fn reoffer(&mut self, index: usize, directions: [(Mid, Direction); 2]) {
        self.offer_change(index, |api| {
            for (mid, direction) in directions {
                api.set_direction(mid, direction);
            }
        });
    }

    /// The client adds a video m-line sending two simulcast layers ("h" and
    /// "l") in a renegotiation offer, and sends its video there from now on.
    pub fn add_simulcast_video(&mut self, index: usize) -> Mid {
        let mut layers = Simulcast::new();
        layers.add_send_layer(SimulcastLayer::new("h"));
        layers.add_send_layer(SimulcastLayer::new("l"));
        let stream = format!("{}-screen", self.clients[index].name);
        let mid = self.offer_change(index, |api| {
            api.add_media(MediaKind::Video, Direction::SendOnly, Some(stream), None, Some(layers))
        });
        let client = &mut self.clients[index];
        client.video = mid;
        client.simulcast = true;
        client.keyframe_due = true;
        mid
    }

    /// The client offers what `change` makes of its m-lines; the SFU answers
    /// and the client takes the answer.
    fn offer_change<T>(&mut self, index: usize, change: impl FnOnce(&mut SdpApi<'_>) -> T) -> T {
        let session = self.clients[index].session.expect("session");
        let mut api = self.clients[index].rtc.sdp_api();
        let made = change(&mut api);
        let (offer, pending) = api.apply().expect("an offer");
        let answer = self
            .sfu
            .accept_offer(self.now, session, &offer.to_sdp_string())
            .expect("the SFU answers");
        self.clients[index]
            .rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("answer"))
            .expect("the client accepts");
        self.drain_client(index);
        self.pump_sfu();
        made
    }

    /// The client starts sending its video on `mid`, one of the SFU's
    /// m-lines it only received on, as a browser's `addTrack` reuses a
    /// transceiver that never sent: it offers that m-line both ways.
    pub fn reuse_for_video(&mut self, index: usize, mid: Mid) {
        let (audio, _) = self.clients[index].own_mids;
        self.reoffer(index, [(audio, Direction::SendOnly), (mid, Direction::SendRecv)]);
        self.clients[index].video = mid;
        self.clients[index].keyframe_due = true;
    }

    pub fn leave(&mut self, index: usize) {
        if let Some(session) = self.clients[index].session.take() {
            self.sfu.close_session(self.now, session);
            self.clients[index].sending = false;
            self.pump_sfu();
        }
    }

    fn drain_client(&mut self, index: usize) {
        let now = self.now;
        let client = &mut self.clients[index];
        loop {
            match client.rtc.poll_output().expect("client output") {
                Output::Timeout(t) => {
                    client.next_timeout = t;
                    break;
                }
                Output::Transmit(t) => self.wire.push_back(Datagram {
                    at: now + LATENCY,
                    source: t.source,
                    destination: t.destination,
                    data: t.contents.to_vec(),
                }),
                Output::Event(event) => match event {
                    Event::RtpPacket(packet) => {
                        let mid = client
                            .rtc
                            .direct_api()
                            .stream_rx(&packet.header.ssrc)
                            .map(|rx| rx.mid());
                        let Some(mid) = mid else { continue };
                        let entry = client.received.entry(mid).or_default();
                        if entry.stream_id.is_empty()
                            && let Some(media) = client.rtc.media(mid)
                        {
                            entry.stream_id = media.stream_id().to_string();
                            entry.kind = Some(media.kind());
                        }
                        let head = packet.payload.iter().take(11).copied().collect();
                        entry.packets.push((*packet.seq_no, now, head, packet.payload.len()));
                        entry.rtp.push((*packet.header.ssrc, packet.header.timestamp));
                        entry.levels.push(packet.header.ext_vals.audio_level);
                        entry.orientations.push(packet.header.ext_vals.video_orientation);
                        if client.listen_all && entry.kind == Some(MediaKind::Audio) {
                            client.ears.entry(mid).or_default().hear(now, &packet.payload);
                        }
                        if client.listen && mid == client.own_mids.0 {
                            let decoder = client
                                .decoder
                                .get_or_insert_with(|| OpusDecoder::new().expect("decoder"));
                            let mut pcm = vec![0f32; MAX_PACKET_SAMPLES];
                            let n = decoder.decode(&packet.payload, &mut pcm).expect("the mix decodes");
                            client.heard.extend_from_slice(&pcm[..n]);
                        }
                    }
                    Event::KeyframeRequest(request)
                        if request.kind == KeyframeRequestKind::Pli || request.kind == KeyframeRequestKind::Fir =>
                    {
                        client.keyframe_requests += 1;
                        client.keyframe_due = true;
                    }
                    Event::EgressBitrateEstimate(str0m::bwe::BweKind::Twcc { estimate, .. }) => {
                        client.estimates.push(estimate.as_u64());
                    }
                    Event::MediaEgressStats(mut stats) => {
                        // (Its loss is only there when a report came since the last.)
                        let last = client.egress.get(&stats.mid).and_then(|s| s.loss);
                        stats.loss = stats.loss.or(last);
                        client.egress.insert(stats.mid, stats);
                    }
                    _ => {}
                },
            }
        }
    }

    fn pump_sfu(&mut self) {
        let started = std::time::Instant::now();
        let mut transmits = Vec::new();
        while let Some(t) = self.sfu.poll_transmit() {
            transmits.push(t);
        }
        let mut events = Vec::new();
        while let Some(event) = self.sfu.poll_event() {
            events.push(event);
        }
        self.sfu_busy += started.elapsed();
        for t in transmits {
            self.wire.push_back(Datagram {
                at: self.now + LATENCY,
                source: t.source,
                destination: t.destination,
                data: t.contents.to_vec(),
            });
        }
        for event in events {
            self.events.push((self.now, event.clone()));
            if let SfuEvent::NegotiationNeeded(session) = event
                && !self.hold_offers
            {
                self.renegotiate(session);
            }
        }
    }

    /// Signalling in zero time: the SFU's offer to the client, the client's answer back.
    pub fn renegotiate(&mut self, session: SessionId) {
        let Some(offer) = self.sfu.create_offer(self.now, session).expect("create offer") else {
            return;
        };
        let Some(index) = self.clients.iter().position(|c| c.session == Some(session)) else {
            return;
        };
        let client = &mut self.clients[index];
        client.streams = offer.streams.clone();
        client.last_offer = offer.sdp.clone();
        let answer = client
            .rtc
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer.sdp).expect("offer parses"))
            .expect("client accepts");
        self.drain_client(index);
        self.sfu
            .accept_answer(self.now, session, &answer.to_sdp_string())
            .expect("sfu accepts answer");
        self.pump_sfu();
    }

    fn send_media(&mut self, index: usize) {
        let now = self.now;
        let start = self.start;
        let client = &mut self.clients[index];
        if !client.sending || !client.rtc.is_connected() {
            return;
        }
        if client.chaos {
            return self.send_chaos(index);
        }
        if now >= client.next_audio {
            client.next_audio += AUDIO_EVERY;
            let pt = client
                .rtc
                .codec_config()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt());
            let mut api = client.rtc.direct_api();
            if let (Some(pt), Some(tx)) = (pt, api.stream_tx_by_mid(client.audio, None)) {
                let ext = ExtensionValues {
                    audio_level: Some(-client.audio_level),
                    voice_activity: Some(true),
                    ..Default::default()
                };
                let ts = (client.audio_seq * 960) as u32;
                let payload = match client.tone {
                    _ if client.junk_audio => {
                        let mut x = (client.audio_seq as u32).wrapping_mul(2_654_435_761) | 1;
                        let len = 1 + (x % 1400) as usize;
                        (0..len)
                            .map(|_| {
                                x ^= x << 13;
                                x ^= x >> 17;
                                x ^= x << 5;
                                x as u8
                            })
                            .collect()
                    }
                    Some((freq, amplitude)) => {
                        let encoder = client
                            .encoder
                            .get_or_insert_with(|| OpusEncoder::new(48_000, 5).expect("encoder"));
                        let mut pcm = vec![0f32; 960];
                        mixer::analysis::sine(freq, amplitude, client.audio_seq * 960, &mut pcm);
                        let mut out = vec![0u8; MAX_PACKET_BYTES];
                        let len = encoder.encode(&pcm, &mut out).expect("encode");
                        out.truncate(len);
                        out
                    }
                    None => {
                        // Byte 1 says who sent it.
                        let mut payload = vec![0xfc; 80];
                        payload[1] = index as u8;
                        payload
                    }
                };
                tx.write_rtp(RtpWrite::new(pt, client.audio_seq.into(), ts, now, payload).ext_vals(ext));
                client.audio_seq += 1;
            }
        }
        if client.send_video && now >= client.next_video {
            client.next_video += VIDEO_EVERY;
            let pt = client
                .rtc
                .codec_config()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt());
            let frame = client.video_seq;
            let keyframe =
                client.keyframe_due || (client.keyframe_every > 0 && frame.is_multiple_of(client.keyframe_every));
            client.keyframe_due = false;
            let mut api = client.rtc.direct_api();
            if client.simulcast {
                for (i, (rid, size)) in [("h", 1000), ("l", 200)].into_iter().enumerate() {
                    let (Some(pt), Some(tx)) = (pt, api.stream_tx_by_mid(client.video, Some(rid.into()))) else {
                        continue;
                    };
                    let mut payload = vec![0x10, if keyframe { 0x00 } else { 0x01 }];
                    payload.resize(size, 0x55);
                    let seq = client.layer_seq[i];
                    client.layer_seq[i] += 1;
                    tx.write_rtp(
                        RtpWrite::new(pt, seq.into(), (frame * 3000) as u32, now, payload)
                            .marker(true)
                            .nackable(true),
                    );
                }
                client.video_seq += 1;
            } else if let (Some(pt), Some(tx)) = (pt, api.stream_tx_by_mid(client.video, None)) {
                for part in 0..client.video_packets_per_frame {
                    // VP8 descriptor (S=1 on a frame's first packet, partition 0),
                    // then the payload header: P=0 for a keyframe.
                    let first = part == 0;
                    let mut payload = vec![if first { 0x10 } else { 0x00 }, if keyframe { 0x00 } else { 0x01 }];
                    payload.resize(1000, 0x55);
                    // The virtual send time, for latency checks; then who sent it.
                    payload[2..10].copy_from_slice(&(now - start).as_micros().to_le_bytes()[..8]);
                    payload[10] = index as u8;
                    let ts = (frame * 3000) as u32;
                    let last = part + 1 == client.video_packets_per_frame;
                    let seq = client.video_packet_seq;
                    client.video_packet_seq += 1;
                    // A phone held sideways: the receiver rotates what it shows.
                    let ext = ExtensionValues {
                        video_orientation: Some(VideoOrientation::Deg90),
                        ..Default::default()
                    };
                    tx.write_rtp(
                        RtpWrite::new(pt, seq.into(), ts, now, payload)
                            .marker(last)
                            .nackable(true)
                            .ext_vals(ext),
                    );
                }
                client.video_seq += 1;
            }
        }
        self.drain_client(index);
    }

    /// What a publisher that passed ICE and DTLS can send that no browser
    /// would: every 20 ms on each of its m-lines one to four RTP packets whose
    /// sequence numbers mostly step but jump ahead or back, with random
    /// timestamps, markers, audio levels, orientations and payload bytes
    /// (1–1,200 of them), on any payload type it negotiated (RTX's included).
    fn send_chaos(&mut self, index: usize) {
        let now = self.now;
        let client = &mut self.clients[index];
        if now < client.next_audio {
            return;
        }
        client.next_audio += AUDIO_EVERY;
        let mut x = client.chaos_state;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pts: Vec<_> = client.rtc.codec_config().params().iter().map(|p| p.pt()).collect();
        for (line, mid) in [client.audio, client.video].into_iter().enumerate() {
            for _ in 0..1 + random() % 4 {
                let seq = if line == 0 {
                    &mut client.audio_seq
                } else {
                    &mut client.video_packet_seq
                };
                *seq = match random() % 16 {
                    0 => *seq + 20_000,
                    1 => seq.saturating_sub(50),
                    _ => *seq + 1,
                };
                let seq = *seq;
                let r = random();
                let ext = ExtensionValues {
                    audio_level: (r & 1 == 0).then(|| -(((r >> 8) % 128) as i8)),
                    voice_activity: Some(r & 2 == 0),
                    video_orientation: (r & 4 == 0).then_some(VideoOrientation::Deg270),
                    ..Default::default()
                };
                let len = 1 + (random() % 1200) as usize;
                let payload: Vec<u8> = (0..len).map(|_| random() as u8).collect();
                let pt = pts[(random() % pts.len() as u64) as usize];
                let ts = random() as u32;
                let marker = random() % 3 == 0;
                let mut api = client.rtc.direct_api();
                if let Some(tx) = api.stream_tx_by_mid(mid, None) {
                    tx.write_rtp(
                        RtpWrite::new(pt, seq.into(), ts, now, payload)
                            .marker(marker)
                            .ext_vals(ext),
                    );
                }
            }
        }
        client.chaos_state = random();
        self.drain_client(index);
    }

    /// Runs the world for `duration` of virtual time.
    pub fn run(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.now < until {
            let mut next = until;
            next = next.min(self.now + Duration::from_millis(5));
            if let Some(t) = self.sfu.poll_timeout() {
                next = next.min(t.max(self.now));
            }
            for c in &self.clients {
                next = next.min(c.next_timeout.max(self.now));
            }
            if let Some(t) = self.wire.iter().map(|d| d.at).min() {
                next = next.min(t.max(self.now));
            }
            // Always move forward a little so a stuck timer cannot stall the loop.
            self.now = next.max(self.now + Duration::from_micros(100));
            self.deliver();
            for i in 0..self.clients.len() {
                if self.clients[i].next_timeout <= self.now {
                    self.clients[i]
                        .rtc
                        .handle_input(Input::Timeout(self.now))
                        .expect("client timeout");
                    self.drain_client(i);
                }
            }
            if self.sfu.poll_timeout().is_some_and(|t| t <= self.now) {
                let started = std::time::Instant::now();
                self.sfu.handle_timeout(self.now);
                self.sfu_busy += started.elapsed();
                self.pump_sfu();
            }
            for i in 0..self.clients.len() {
                self.send_media(i);
            }
        }
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut rest = VecDeque::new();
        for d in self.wire.drain(..) {
            if d.at <= now { due.push(d) } else { rest.push_back(d) }
        }
        self.wire = rest;
        for d in due {
            if let Some(loss) = self.loss.as_mut()
                && loss(d.source, d.destination, &d.data)
            {
                continue;
            }
            if d.destination == self.sfu_addr {
                let started = std::time::Instant::now();
                self.sfu.handle_receive(now, d.source, d.destination, &d.data);
                self.sfu_busy += started.elapsed();
                self.pump_sfu();
            } else if let Some(i) = self.clients.iter().position(|c| c.addr == d.destination) {
                let receive = Receive::new(Protocol::Udp, d.source, d.destination, &d.data).expect("datagram");
                if self.clients[i].rtc.handle_input(Input::Receive(now, receive)).is_ok() {
                    self.drain_client(i);
                }
            }
        }
    }

    /// Injects a raw datagram at the SFU, as from `source`.
    pub fn inject(&mut self, source: SocketAddr, data: &[u8]) {
        self.sfu.handle_receive(self.now, source, self.sfu_addr, data);
        self.pump_sfu();
    }

    /// Per publisher user id and kind: the packets `index` received from them.
    pub fn received_from(&self, index: usize) -> HashMap<(String, MediaKind), Received> {
        let client = &self.clients[index];
        let mut out = HashMap::new();
        for received in client.received.values() {
            let Some(stream) = client.streams.iter().find(|s| s.stream_id == received.stream_id) else {
                continue;
            };
            let Some(kind) = received.kind else { continue };
            out.insert((stream.publisher.user_id.clone(), kind), received.clone());
        }
        out
    }
}

/// The simulated address of the `index`th client.
fn client_addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 10 + (index % 200) as u8], 5000 + (index / 200) as u16))
}

/// When a packet stamped by `send_media` was sent, relative to `start`.
pub fn sent_at(start: Instant, head: &[u8]) -> Option<Instant> {
    let micros = u64::from_le_bytes(head.get(2..10)?.try_into().ok()?);
    Some(start + Duration::from_micros(micros))
}

/// Whether an SRTP datagram carries RTP of payload type `pt` (the RTP header is in the clear).
pub fn is_rtp_with_pt(data: &[u8], pt: u8) -> bool {
    data.len() > 12 && data[0] >> 6 == 2 && (data[1] & 0x7f) == pt
}
