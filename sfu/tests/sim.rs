//! Simulation tests of the SFU core in virtual time: real str0m peers, a
//! simulated network, no sockets and no sleeping.

mod common;

use common::{World, is_rtp_with_pt};
use std::time::{Duration, Instant};
use str0m::media::MediaKind;
use switchboard_sfu::{DropReason, OwnLines, SfuEvent, ShardStats};

fn user(name: &str) -> String {
    format!("@{name}:test")
}

/// Sequence numbers sorted without repeats, and how many between the first
/// and the last are not among them.
fn holes(mut seqs: Vec<u64>) -> (Vec<u64>, u64) {
    seqs.sort_unstable();
    seqs.dedup();
    let missing = match (seqs.first(), seqs.last()) {
        (Some(first), Some(last)) => last - first + 1 - seqs.len() as u64,
        _ => 0,
    };
    (seqs, missing)
}

#[test]
fn three_participants_exchange_audio_and_video() {
    let mut world = World::new();
    let names = ["alice", "bob", "carol"];
    for name in names {
        world.join(name);
    }
    world.run(Duration::from_secs(4));
    for (i, me) in names.iter().enumerate() {
        let got = world.received_from(i);
        for other in names.iter().filter(|n| *n != me) {
            for kind in [MediaKind::Audio, MediaKind::Video] {
                let received = got
                    .get(&(user(other), kind))
                    .unwrap_or_else(|| panic!("{me} got no {kind} from {other}"));
                assert!(
                    received.packets.len() > 40,
                    "{me} got only {} {kind} packets from {other}",
                    received.packets.len()
                );
            }
        }
        assert!(
            !got.contains_key(&(user(me), MediaKind::Audio)),
            "{me} must not receive itself"
        );
        // Every stream is labelled with its publisher: user and device.
        let streams = &world.clients[i].streams;
        assert_eq!(streams.len(), 2, "{me}: {streams:?}");
        assert!(
            streams
                .iter()
                .all(|s| s.audio && s.video && s.publisher.device_id.ends_with("DEV"))
        );
    }
    let stats = world.sfu.stats();
    assert_eq!(
        (stats.sessions, stats.rooms, stats.tracks, stats.subscriptions),
        (3, 1, 6, 12)
    );
    assert!(stats.packets_forwarded > 1000);
    // Audio is sealed by the SFU itself but for one packet a second per
    // stream (str0m's, for its sender reports): 6 streams × 4 s.
    let audio: usize = (0..3)
        .flat_map(|i| world.received_from(i).into_iter())
        .filter(|((_, kind), _)| *kind == MediaKind::Audio)
        .map(|(_, r)| r.packets.len())
        .sum();
    assert!(
        stats.packets_sealed as usize >= audio.saturating_sub(6 * 5) && stats.packets_sealed > 0,
        "{} of {audio} audio packets sealed by the SFU",
        stats.packets_sealed
    );
    for received in world.clients[0].received.values() {
        if received.kind == Some(MediaKind::Audio) {
            assert!(
                received.levels.iter().all(|l| *l == Some(-30)),
                "audio levels arrive with every packet: {:?}",
                &received.levels[..10.min(received.levels.len())]
            );
        }
    }
    // Video is sealed by the SFU too (no bandwidth estimate in this room), with
    // its orientation, which every packet carries whichever way it went.
    let video_packets: usize = (0..3)
        .flat_map(|i| world.received_from(i).into_iter())
        .filter(|((_, kind), _)| *kind == MediaKind::Video)
        .map(|(_, r)| r.packets.len())
        .sum();
    assert!(
        stats.packets_sealed as usize >= audio + video_packets - 12 * 5,
        "{} of {audio} audio and {video_packets} video packets sealed by the SFU",
        stats.packets_sealed
    );
    for received in world.clients[0].received.values() {
        if received.kind == Some(MediaKind::Video) {
            assert!(
                received
                    .orientations
                    .iter()
                    .all(|o| *o == Some(str0m::rtp::VideoOrientation::Deg90)),
                "orientation arrives with every packet: {:?}",
                &received.orientations[..10.min(received.orientations.len())]
            );
        }
    }
    // Each sends one participant's media and receives two: the bitrates count
    // what the SFU seals itself (str0m's own counters see almost none of it).
    for client in &world.clients {
        let stats = world
            .sfu
            .session_stats(client.session.expect("session"))
            .expect("stats");
        assert!(
            stats.bitrate_out_bps > stats.bitrate_in_bps * 3 / 2 && stats.bitrate_in_bps > 100_000,
            "{}: in {} bps, out {} bps",
            client.name,
            stats.bitrate_in_bps,
            stats.bitrate_out_bps
        );
    }
    // Video is forwarded as it arrives, not queued behind a pacer: two hops of
    // 10 ms each, whatever the bandwidth estimate says.
    let video = &world.received_from(0)[&(user("bob"), MediaKind::Video)];
    let worst = video
        .packets
        .iter()
        .filter_map(|p| common::sent_at(world.start, &p.2).map(|sent| p.1 - sent))
        .max()
        .expect("latencies");
    assert!(worst < Duration::from_millis(40), "worst video latency {worst:?}");
    // Sequence numbers arrive contiguous (no loss on this network).
    for received in world.clients[0].received.values() {
        let seqs: Vec<u64> = received.packets.iter().map(|p| p.0).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gaps in {seqs:?}");
    }
}

#[test]
fn late_joiner_gets_a_keyframe_promptly() {
    let mut world = World::new();
    let alice = world.join("alice");
    world.join("bob");
    // Keyframes only on request from now on.
    world.clients[alice].keyframe_every = 0;
    world.run(Duration::from_secs(3));
    let requests_before = world.clients[alice].keyframe_requests;

    let carol = world.join("carol");
    let joined = world.now;
    world.run(Duration::from_secs(2));
    let from_alice = world.received_from(carol);
    let video = from_alice
        .get(&(user("alice"), MediaKind::Video))
        .expect("carol receives alice's video");
    let (_, first_at, head, _) = &video.packets[0];
    assert_eq!(head[1] & 0x01, 0, "the first video packet carol gets starts a keyframe");
    assert!(
        *first_at - joined < Duration::from_millis(800),
        "first video after {:?}",
        *first_at - joined
    );
    assert!(
        world.clients[alice].keyframe_requests > requests_before,
        "the SFU asked alice for a keyframe"
    );
    assert!(
        world.sfu.stats().drops(DropReason::WaitingForKeyframe) > 0,
        "interframes before it were held back"
    );
}

#[test]
fn forged_packets_naming_a_callers_m_line_do_not_take_its_keyframe_requests() {
    // Someone who knows alice's address sends RTP from it under an SSRC of
    // their own, with her video m-line's mid (the header is not encrypted,
    // and fails authentication). Keyframe requests for her video must still
    // reach her stream, not the forged one.
    let mut world = World::new();
    let alice = world.join("alice");
    world.join("bob");
    world.clients[alice].keyframe_every = 0;
    world.run(Duration::from_secs(3));
    let from = world.clients[alice].addr;
    let video = world.clients[alice].own_mids.1.to_string();
    for n in 0..20u16 {
        // Mid in str0m's standard extension map: id 4.
        let mut forged = vec![0x90, 96];
        forged.extend_from_slice(&n.to_be_bytes());
        forged.extend_from_slice(&[0, 0, 0, 1, 0x0b, 0xad, 0xf0, 0x0d, 0xbe, 0xde, 0, 0]);
        let start = forged.len();
        forged.push((4 << 4) | (video.len() as u8 - 1));
        forged.extend_from_slice(video.as_bytes());
        while (forged.len() - start) % 4 != 0 {
            forged.push(0);
        }
        let words = ((forged.len() - start) / 4) as u16;
        forged[start - 2..start].copy_from_slice(&words.to_be_bytes());
        forged.extend_from_slice(&[0x55; 100]);
        world.inject(from, &forged);
        world.run(Duration::from_millis(5));
    }
    let requests_before = world.clients[alice].keyframe_requests;
    let carol = world.join("carol");
    world.run(Duration::from_secs(2));
    assert!(
        world.clients[alice].keyframe_requests > requests_before,
        "the SFU asked alice (not the forged stream) for a keyframe"
    );
    let video = world.received_from(carol);
    assert!(
        video
            .get(&(user("alice"), MediaKind::Video))
            .is_some_and(|v| v.packets.len() > 20),
        "carol sees alice"
    );
}

#[test]
fn a_participant_leaving_is_removed_from_the_others() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    world.run(Duration::from_secs(2));
    let session = world.clients[carol].session.expect("carol's session");
    // The m-lines on which alice and bob receive carol.
    let carol_mids: Vec<Vec<str0m::media::Mid>> = [alice, bob]
        .iter()
        .map(|&i| {
            let carol_streams: Vec<String> = world.clients[i]
                .streams
                .iter()
                .filter(|s| s.publisher.user_id == user("carol"))
                .map(|s| s.stream_id.clone())
                .collect();
            world.clients[i]
                .received
                .iter()
                .filter(|(_, r)| carol_streams.contains(&r.stream_id))
                .map(|(m, _)| *m)
                .collect()
        })
        .collect();
    assert!(
        carol_mids.iter().all(|m| m.len() == 2),
        "audio and video from carol: {carol_mids:?}"
    );
    world.leave(carol);
    let left_at = world.now;
    world.run(Duration::from_secs(2));
    for (n, &i) in [alice, bob].iter().enumerate() {
        // Nothing from carol after she left (packets in flight excepted).
        for mid in &carol_mids[n] {
            let late = world.clients[i].received[mid]
                .packets
                .iter()
                .filter(|p| p.1 > left_at + 2 * common::LATENCY)
                .count();
            assert_eq!(late, 0, "client {i} kept receiving carol");
        }
        // The others still hear each other.
        let got = world.received_from(i);
        let other = if i == alice { "bob" } else { "alice" };
        let recent = got[&(user(other), MediaKind::Audio)]
            .packets
            .iter()
            .filter(|p| p.1 > left_at)
            .count();
        assert!(recent > 50, "client {i} stopped receiving {other}");
        // They were renegotiated: carol's stream is no longer announced, her m-lines are inactive.
        assert!(
            world.clients[i]
                .streams
                .iter()
                .all(|s| s.publisher.user_id != user("carol"))
        );
        for mid in &carol_mids[n] {
            let direction = world.clients[i].rtc.media(*mid).map(|m| m.direction());
            assert_eq!(
                direction,
                Some(str0m::media::Direction::Inactive),
                "client {i} m-line {mid}"
            );
        }
    }
    let stats = world.sfu.stats();
    assert_eq!((stats.sessions, stats.tracks, stats.subscriptions), (2, 4, 4));
    assert!(world.sfu.session_stats(session).is_none());
    assert!(
        world
            .events
            .iter()
            .any(|(at, e)| *at >= left_at && matches!(e, SfuEvent::NegotiationNeeded(_)))
    );
}

/// Drops every 20th VP8 packet (PT 96) the SFU sends to client `to`.
fn drop_every_20th_video_to(world: &mut World, to: usize) {
    let (sfu, addr) = (world.sfu_addr, world.clients[to].addr);
    let mut count = 0u64;
    world.loss = Some(Box::new(move |src, dst, data| {
        if src == sfu && dst == addr && is_rtp_with_pt(data, 96) {
            count += 1;
            return count.is_multiple_of(20);
        }
        false
    }));
}

/// Drops every 20th of `from`'s video datagrams to the SFU (the first copy
/// of a packet: retransmissions come on another payload type).
fn drop_every_20th_video_from(world: &mut World, from: usize) {
    let (sfu, addr) = (world.sfu_addr, world.clients[from].addr);
    let mut count = 0u64;
    world.loss = Some(Box::new(move |src, dst, data| {
        if src == addr && dst == sfu && is_rtp_with_pt(data, 96) {
            count += 1;
            return count.is_multiple_of(20);
        }
        false
    }));
}

#[test]
fn a_publishers_lost_video_is_asked_for_again_by_the_sfu_which_opens_it() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    drop_every_20th_video_from(&mut world, alice);
    world.run(Duration::from_secs(6));
    world.loss = None;
    world.clients[alice].sending = false;
    world.run(Duration::from_secs(1));
    let stats = world.sfu.stats();
    assert!(
        stats.packets_opened > 400,
        "video and audio opened by the SFU: {}",
        stats.packets_opened
    );
    // Alice's str0m got our NACKs and resent on its RTX stream, which we restored.
    let nacks = world.clients[alice].egress.values().map(|e| e.nacks).sum::<u64>();
    assert!(nacks > 5, "alice got {nacks} NACKs");
    let video = &world.received_from(bob)[&(user("alice"), MediaKind::Video)];
    let seqs: Vec<u64> = video.packets.iter().map(|p| p.0).collect();
    assert!(seqs.len() > 150, "bob got {} video packets", seqs.len());
    let all = seqs.len();
    let (seqs, missing) = holes(seqs);
    assert_eq!(seqs.len(), all, "none twice");
    assert_eq!(missing, 0, "every lost packet was recovered");
}

#[test]
fn callers_without_the_mid_extension_are_known_by_their_ssrc_lines() {
    let mut world = World::new();
    world.client_without_mid = true;
    let alice = world.join("alice");
    let bob = world.join("bob");
    // Lost video comes back on alice's RTX SSRC, known by its ssrc-group only.
    drop_every_20th_video_from(&mut world, alice);
    world.run(Duration::from_secs(5));
    world.loss = None;
    world.clients[alice].sending = false;
    world.run(Duration::from_secs(1));
    assert!(
        world.sfu.stats().packets_opened > 400,
        "opened {}",
        world.sfu.stats().packets_opened
    );
    let got = world.received_from(bob);
    assert!(got[&(user("alice"), MediaKind::Audio)].packets.len() > 200);
    let seqs: Vec<u64> = got[&(user("alice"), MediaKind::Video)]
        .packets
        .iter()
        .map(|p| p.0)
        .collect();
    assert!(seqs.len() > 100, "bob got {} video packets", seqs.len());
    assert_eq!(holes(seqs).1, 0, "every lost packet recovered");
}

#[test]
fn publishers_that_estimate_their_uplink_get_transport_wide_feedback_from_the_sfu() {
    let mut world = World::new();
    world.client_bwe = true;
    let alice = world.join("alice");
    world.join("bob");
    world.run(Duration::from_secs(5));
    assert!(world.sfu.stats().packets_opened > 200);
    // str0m's estimator only moves on transport-wide feedback: ours.
    let estimates = &world.clients[alice].estimates;
    assert!(!estimates.is_empty(), "alice's estimator heard nothing");
    let last = *estimates.last().expect("an estimate");
    assert!(last > 300_000, "alice's uplink estimate {last} bps");
}

#[test]
fn five_percent_loss_is_recovered_by_nack() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    // Retransmissions included: the SFU seals video itself here and resends on the same SSRC.
    drop_every_20th_video_to(&mut world, bob);
    world.run(Duration::from_secs(6));
    world.loss = None;
    world.clients[alice].sending = false;
    world.run(Duration::from_secs(1));
    let video = &world.received_from(bob)[&(user("alice"), MediaKind::Video)];
    let mut seqs: Vec<u64> = video.packets.iter().map(|p| p.0).collect();
    assert!(seqs.len() > 150, "bob got {} video packets", seqs.len());
    let reordered = seqs.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(reordered > 0, "some packets were lost and came back late, out of order");
    seqs.sort_unstable();
    seqs.dedup();
    let span = seqs[seqs.len() - 1] - seqs[0] + 1;
    assert_eq!(span, seqs.len() as u64, "every lost packet was recovered");
    let stats = world.sfu.stats();
    assert!(
        stats.packets_resent as usize >= (seqs.len() / 20) * 9 / 10,
        "resent from the SFU's own history: {} of ~{} lost",
        stats.packets_resent,
        seqs.len() / 20
    );
}

#[test]
fn in_a_simulcast_room_str0m_resends_the_video_it_sent() {
    // Sessions there estimate bandwidth, so str0m sends their video (its
    // estimator sees every packet) and answers NACKs with RTX (PT 97).
    let mut world = World::new();
    world.join_with("carol", true);
    let dave = world.join("dave");
    drop_every_20th_video_to(&mut world, dave);
    world.run(Duration::from_secs(6));
    world.loss = None;
    world.run(Duration::from_secs(1));
    let video = &world.received_from(dave)[&(user("carol"), MediaKind::Video)];
    let mut seqs: Vec<u64> = video.packets.iter().map(|p| p.0).collect();
    assert!(seqs.len() > 100, "dave got {} video packets", seqs.len());
    seqs.sort_unstable();
    seqs.dedup();
    let span = seqs[seqs.len() - 1] - seqs[0] + 1;
    assert!(
        span - seqs.len() as u64 <= 2,
        "lost {} of {span}",
        span - seqs.len() as u64
    );
    assert_eq!(world.sfu.stats().packets_resent, 0, "str0m resent them, not the SFU");
}

#[test]
fn garbage_and_strangers_are_counted_drops() {
    let mut world = World::new();
    world.join("alice");
    world.join("bob");
    world.run(Duration::from_secs(1));
    let alice_addr = world.clients[0].addr;
    let stranger = "127.0.0.99:9999".parse().expect("addr");
    let before = world.sfu.stats();
    let mut garbage = vec![0u8; 0];
    for i in 0..200u32 {
        garbage.clear();
        garbage.extend((0..(i % 300)).map(|b| (b.wrapping_mul(31).wrapping_add(i)) as u8));
        world.inject(stranger, &garbage);
        world.inject(alice_addr, &garbage);
    }
    // RTCP-shaped garbage from a subscriber of video we seal: it is opened as
    // SRTCP (and fails authentication) before str0m rejects it; short, long,
    // with and without the encrypted flag. No resend comes of it.
    let resent = world.sfu.stats().packets_resent;
    for i in 0..300u32 {
        let len = 4 + (i as usize * 7) % 1400;
        let mut rtcp: Vec<u8> = (0..len).map(|b| (b as u32 * 17 + i) as u8).collect();
        rtcp[0] = 0x80 | (i % 32) as u8;
        rtcp[1] = 192 + (i % 32) as u8;
        if i % 2 == 0 {
            rtcp[len - 4] |= 0x80;
        }
        world.inject(alice_addr, &rtcp);
    }
    assert_eq!(world.sfu.stats().packets_resent, resent);
    // Truncated and replayed copies of real traffic from a stranger's address.
    world.inject(stranger, &[0x00, 0x01, 0x00, 0x00]);
    world.inject(stranger, &[0x80, 0x60, 0x00, 0x01, 0, 0, 0, 0]);
    let after = world.sfu.stats();
    assert!(after.drops(DropReason::UnknownSource) >= before.drops(DropReason::UnknownSource) + 200);
    assert!(
        after.drops(DropReason::Malformed) + after.drops(DropReason::Rejected) > before.drops(DropReason::Rejected)
    );
    // Everyone still works.
    world.run(Duration::from_secs(2));
    let got = world.received_from(1);
    let recent = got[&(user("alice"), MediaKind::Audio)]
        .packets
        .iter()
        .filter(|p| p.1 > world.now - Duration::from_secs(1))
        .count();
    assert!(recent > 40, "bob still hears alice ({recent})");
    assert_eq!(world.sfu.stats().sessions, 2);
}

/// Carol passed DTLS-SRTP and sends nonsense (`Client::chaos`); alice and
/// bob, joined with `join`, are not disturbed. Returns the shard's stats.
fn nonsense_from_carol(join: fn(&mut World, &str) -> usize) -> ShardStats {
    let mut world = World::new();
    let alice = join(&mut world, "alice");
    let bob = join(&mut world, "bob");
    let carol = join(&mut world, "carol");
    let video = world.clients[alice].send_video;
    world.clients[carol].chaos = true;
    world.run(Duration::from_secs(4));
    let stats = world.sfu.stats();
    assert_eq!(stats.sessions, 3, "carol's nonsense closed no session");
    assert_eq!(stats.drops(DropReason::StackPanic), 0);
    // It passed SRTP: it reached the forwarding path (and was forwarded or dropped there).
    let from_carol = world
        .received_from(alice)
        .get(&(user("carol"), MediaKind::Audio))
        .map_or(0, |r| r.packets.len())
        + world
            .received_from(alice)
            .get(&(user("carol"), MediaKind::Video))
            .map_or(0, |r| r.packets.len());
    let dropped = stats.drops(DropReason::UnknownPayloadType) + stats.drops(DropReason::WaitingForKeyframe);
    assert!(
        from_carol + dropped as usize > 100,
        "carol's packets went nowhere: {from_carol} forwarded, {dropped} dropped"
    );
    // Alice and Bob still get each other's media, all of it, in the last second.
    let recent = |to: usize, from: &str, kind: MediaKind| {
        world.received_from(to)[&(user(from), kind)]
            .packets
            .iter()
            .filter(|p| p.1 > world.now - Duration::from_secs(1))
            .count()
    };
    assert!(recent(bob, "alice", MediaKind::Audio) >= 45);
    assert!(recent(alice, "bob", MediaKind::Audio) >= 45);
    if video {
        assert!(recent(bob, "alice", MediaKind::Video) >= 25);
    }
    stats
}

#[test]
fn nonsense_from_an_authenticated_publisher_never_reaches_the_others_state() {
    nonsense_from_carol(World::join);
}

#[test]
fn nonsense_audio_the_sfu_opens_itself_never_reaches_the_others_state() {
    let stats = nonsense_from_carol(World::join_audio_only);
    // All three callers' audio, carol's nonsense included, was opened by the SFU.
    // (Alice's and bob's ~200 each, carol's 1-4 every 20 ms.)
    assert!(stats.packets_opened > 700, "opened {}", stats.packets_opened);
}

#[test]
fn bad_sdp_is_an_error_not_a_panic() {
    let mut world = World::new();
    let now = world.now;
    let room = world.room.clone();
    let who = switchboard_sfu::Participant {
        user_id: "@x:test".into(),
        device_id: "X".into(),
    };
    for sdp in ["", "v=0", "garbage\r\nmore", &"a".repeat(100_000)] {
        assert!(
            world
                .sfu
                .open_session(now, room.clone(), who.clone(), sdp, OwnLines::BothWays)
                .is_err()
        );
    }
    assert_eq!(world.sfu.stats().sessions, 0);
    let alice = world.join("alice");
    let session = world.clients[alice].session.expect("session");
    assert!(world.sfu.accept_answer(now, session, "v=0").is_err());
    assert!(world.sfu.accept_offer(now, session, "nonsense").is_err());
    world.run(Duration::from_millis(500));
    assert!(world.sfu.is_connected(session));
}

#[test]
fn an_offer_str0m_panics_on_is_refused_and_the_shard_goes_on() {
    // Found by fuzzing (`fuzz/fuzz_targets/sfu_sdp.rs`, minimized): a mangled
    // browser offer whose audio section also maps the video section's H.264
    // payload type. str0m 0.25 asserts on it ("Pt locked multiple times");
    // uncontained, that panic ended the shard thread and every call on it.
    let bad = include_str!("data/offer-locks-a-payload-type-twice.sdp");
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    world.run(Duration::from_secs(1));
    let who = switchboard_sfu::Participant {
        user_id: "@mallory:test".into(),
        device_id: "M".into(),
    };
    let room = world.room.clone();
    // Offered both ways (a single-stream caller's offer is taken as it is).
    let refused = world
        .sfu
        .open_session(world.now, room, who, bad, OwnLines::BothWays)
        .expect_err("refused");
    assert!(
        matches!(refused, switchboard_sfu::SfuError::InvalidSdp(_)),
        "{refused:?}"
    );
    assert_eq!(world.sfu.stats().sessions, 2);
    // Alice and Bob never noticed.
    world.run(Duration::from_secs(1));
    let recent = |to: usize, from: &str| {
        world.received_from(to)[&(user(from), MediaKind::Audio)]
            .packets
            .iter()
            .filter(|p| p.1 > world.now - Duration::from_millis(500))
            .count()
    };
    assert!(recent(bob, "alice") >= 20 && recent(alice, "bob") >= 20);
}

#[test]
fn a_session_that_never_connects_is_closed() {
    let mut world = World::new();
    let alice = world.join("alice");
    // Cut alice off entirely: nothing she sends arrives.
    let alice_addr = world.clients[alice].addr;
    world.loss = Some(Box::new(move |src, _, _| src == alice_addr));
    world.run(Duration::from_secs(25));
    assert!(
        world
            .events
            .iter()
            .any(|(_, e)| matches!(e, SfuEvent::Closed(_, switchboard_sfu::CloseReason::ConnectTimeout)))
    );
    assert_eq!(world.sfu.stats().sessions, 0);
}

#[test]
fn the_loudest_participant_is_the_active_speaker_without_flapping() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    world.clients[alice].audio_level = 25;
    world.clients[bob].audio_level = 80;
    world.clients[carol].audio_level = 80;
    world.run(Duration::from_secs(3));
    let sessions: Vec<_> = world.clients.iter().map(|c| c.session.expect("session")).collect();
    let session = |i: usize| sessions[i];
    assert_eq!(world.sfu.active_speaker(&world.room), Some(session(alice)));

    // Bob starts talking and alice falls silent: bob takes over, once.
    world.clients[alice].audio_level = 90;
    world.clients[bob].audio_level = 20;
    let switched_at = world.now;
    world.run(Duration::from_secs(3));
    assert_eq!(world.sfu.active_speaker(&world.room), Some(session(bob)));
    let changes: Vec<_> = world
        .events
        .iter()
        .filter(|(at, e)| *at >= switched_at && matches!(e, SfuEvent::ActiveSpeaker { .. }))
        .collect();
    assert_eq!(changes.len(), 1, "one switch, no flapping: {changes:?}");
    assert!(
        changes[0].0 - switched_at < Duration::from_millis(1500),
        "switched after {:?}",
        changes[0].0 - switched_at
    );

    // Nearly as loud as bob is not enough to take over.
    world.clients[carol].audio_level = 22;
    world.run(Duration::from_secs(2));
    assert_eq!(world.sfu.active_speaker(&world.room), Some(session(bob)));
}

/// The first codec of the first video m-line of an SDP.
fn first_video_codec(sdp: &str) -> String {
    let mut lines = sdp.lines();
    let m_line = lines.find(|l| l.starts_with("m=video")).expect("a video m-line");
    let first_pt = m_line.split_whitespace().nth(3).expect("a payload type");
    let rtpmap = format!("a=rtpmap:{first_pt} ");
    lines
        .find_map(|l| l.strip_prefix(rtpmap.as_str()))
        .expect("its rtpmap")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn the_answer_follows_the_offers_video_codec_preference() {
    use str0m::media::Direction;
    let now = std::time::Instant::now();
    let mut sfu = switchboard_sfu::Sfu::new(switchboard_sfu::SfuConfig::new(
        "127.0.0.1:40000".parse().expect("addr"),
    ));
    for (prefer_h264, expected) in [(true, "H264"), (false, "VP8")] {
        let config = str0m::RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false);
        let config = if prefer_h264 {
            config.enable_h264(true).enable_vp8(true)
        } else {
            config.enable_vp8(true).enable_h264(true)
        };
        let mut client = config.build(now);
        client
            .add_local_candidate(str0m::Candidate::host("127.0.0.1:5000".parse().expect("addr"), "udp").expect("host"));
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
        let (offer, _) = api.apply().expect("offer");
        let offer = offer.to_sdp_string();
        assert_eq!(first_video_codec(&offer), expected, "the client's own preference");
        let who = switchboard_sfu::Participant {
            user_id: "@x:test".into(),
            device_id: "X".into(),
        };
        let (_, answer) = sfu
            .open_session(
                now,
                switchboard_sfu::RoomId("!r:test".into()),
                who,
                &offer,
                OwnLines::BothWays,
            )
            .expect("open");
        assert_eq!(first_video_codec(&answer), expected, "the SFU follows it");
    }
}

#[test]
fn simulcast_layer_switches_keep_sequence_numbers_continuous() {
    use switchboard_sfu::simulcast::Quality;
    let mut world = World::new();
    let alice = world.join_with("alice", true);
    let bob = world.join("bob");
    world.run(Duration::from_secs(3));
    let bob_session = world.clients[bob].session.expect("session");
    let stream_id = world.clients[bob].streams[0].stream_id.clone();
    let video = |world: &World| world.received_from(bob)[&(user("alice"), MediaKind::Video)].clone();
    let recent_sizes = |world: &World| -> Vec<usize> {
        let since = world.now - Duration::from_millis(500);
        video(world)
            .packets
            .iter()
            .filter(|p| p.1 > since)
            .map(|p| p.3)
            .collect()
    };
    assert!(
        recent_sizes(&world).iter().all(|&n| n == 1000),
        "plenty of bandwidth: the high layer"
    );

    let now = world.now;
    world.sfu.set_max_quality(now, bob_session, &stream_id, Quality::Low);
    let switched = world.now;
    world.run(Duration::from_secs(2));
    let sizes = recent_sizes(&world);
    assert!(
        !sizes.is_empty() && sizes.iter().all(|&n| n == 200),
        "asked for low: {sizes:?}"
    );
    let first_low = video(&world)
        .packets
        .into_iter()
        .find(|p| p.1 > switched && p.3 == 200)
        .expect("a low packet");
    assert_eq!(first_low.2[1] & 0x01, 0, "the switch happens on a keyframe");

    let now = world.now;
    world.sfu.set_max_quality(now, bob_session, &stream_id, Quality::High);
    world.run(Duration::from_secs(2));
    assert!(recent_sizes(&world).iter().all(|&n| n == 1000), "back to high");

    // Across both switches bob saw one continuous sequence, though the layers
    // are numbered independently (from 0 and from 5000) by alice.
    let mut seqs: Vec<u64> = video(&world).packets.iter().map(|p| p.0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs[seqs.len() - 1] - seqs[0] + 1,
        seqs.len() as u64,
        "no gap in bob's sequence numbers"
    );
    assert!(
        world.clients[alice].keyframe_requests >= 2,
        "each switch asked for a keyframe"
    );
}

#[test]
fn simulcast_sent_on_a_session_we_open_is_forwarded_one_layer_at_a_time() {
    // Alice joined a room without simulcast: the SFU opens what she sends
    // itself. Then she adds a video m-line with two simulcast layers (by
    // renegotiation): bob must get one layer of it as one stream, not both
    // layers' packets interleaved under one numbering; and what the SFU asks
    // her to resend must come back into the layer it was lost from.
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    world.run(Duration::from_secs(2));
    world.add_simulcast_video(alice);
    world.run(Duration::from_secs(2)); // (its layers' bitrates measured)
    let lossy = world.now;
    // Every 19th of her video datagrams lost: the layers' packets alternate,
    // so both lose some.
    let (sfu, addr) = (world.sfu_addr, world.clients[alice].addr);
    let mut count = 0u64;
    world.loss = Some(Box::new(move |src, dst, data| {
        if src == addr && dst == sfu && is_rtp_with_pt(data, 96) {
            count += 1;
            return count.is_multiple_of(19);
        }
        false
    }));
    world.run(Duration::from_secs(4));
    let until = world.now;
    world.loss = None;
    world.clients[alice].sending = false;
    world.run(Duration::from_secs(1));
    // (Its "h" layer is filled with 0x55, its "l" layer is 200 bytes a packet;
    // her camera's packets carry her index there.)
    let simulcast = |p: &(u64, Instant, Vec<u8>, usize)| p.3 == 200 || p.2.get(10) == Some(&0x55);
    let screen = world.clients[bob]
        .received
        .values()
        .find(|r| r.kind == Some(MediaKind::Video) && r.packets.iter().any(simulcast))
        .cloned()
        .expect("bob receives alice's simulcast video");
    assert!(screen.packets.iter().all(simulcast), "on a stream of its own");
    let sizes: Vec<usize> = screen
        .packets
        .iter()
        .filter(|p| p.1 > lossy && p.1 < until)
        .map(|p| p.3)
        .collect();
    assert!(sizes.len() > 30, "video flows: {}", sizes.len());
    assert!(
        sizes.iter().all(|&n| n == sizes[0]),
        "one layer at a time: {:?}",
        &sizes[..sizes.len().min(40)]
    );
    // (Counted from where the loss started: a packet lost just before a
    // layer switch is not forwarded after it, as the old layer's.)
    let seqs: Vec<u64> = screen.packets.iter().filter(|p| p.1 > lossy).map(|p| p.0).collect();
    let all = seqs.len();
    let (seqs, missing) = holes(seqs);
    assert_eq!(seqs.len(), all, "none twice");
    assert_eq!(missing, 0, "one numbering, every lost packet recovered");
}

#[test]
fn forged_streams_from_a_spoofed_source_do_not_keep_a_callers_new_streams_out() {
    // Someone who knows alice's address sends RTP from it under 40 SSRCs of
    // their own (failing authentication); then alice adds a simulcast video
    // m-line: its layers and their retransmissions must still find a place.
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    world.run(Duration::from_secs(2));
    let from = world.clients[alice].addr;
    for ssrc in 0..40u32 {
        let mut forged = vec![0x80, 96, 0, 1, 0, 0, 0, 1];
        forged.extend_from_slice(&(0x7000_0000 + ssrc).to_be_bytes());
        forged.extend_from_slice(&[0x55; 60]);
        world.inject(from, &forged);
    }
    let stats = world.sfu.stats();
    let dropped = stats.drops(DropReason::Rejected) + stats.drops(DropReason::NoTrack);
    assert!(dropped >= 40, "all dropped: {dropped}");
    world.add_simulcast_video(alice);
    world.run(Duration::from_secs(3));
    let layered = world.clients[bob]
        .received
        .values()
        .filter(|r| r.kind == Some(MediaKind::Video))
        .map(|r| {
            r.packets
                .iter()
                .filter(|p| p.3 == 200 || p.2.get(10) == Some(&0x55))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(layered > 40, "bob gets alice's new video: {layered} packets");
}

#[test]
fn forwarded_video_is_not_held_back_by_pacing() {
    // Four participants each sending ~1 Mbit/s of video: every subscriber gets
    // ~3 Mbit/s, far above the initial bandwidth estimate. An SFU relays as
    // packets arrive; a pacer would queue them for seconds.
    let mut world = World::new();
    for name in ["alice", "bob", "carol", "dave"] {
        let i = world.join(name);
        world.clients[i].video_packets_per_frame = 4;
    }
    world.run(Duration::from_secs(4));
    let since = world.now - Duration::from_secs(2);
    for (i, receiver) in world.clients.iter().enumerate() {
        let got = world.received_from(i);
        for ((publisher, kind), received) in got {
            if kind != MediaKind::Video {
                continue;
            }
            let recent: Vec<Duration> = received
                .packets
                .iter()
                .filter(|p| p.1 > since)
                .filter_map(|p| common::sent_at(world.start, &p.2).map(|sent| p.1 - sent))
                .collect();
            assert!(
                recent.len() > 150,
                "{} got {} recent packets from {publisher}",
                receiver.name,
                recent.len()
            );
            let worst = recent.iter().max().copied().unwrap_or_default();
            assert!(
                worst < Duration::from_millis(40),
                "{} from {publisher}: worst latency {worst:?}",
                receiver.name
            );
        }
    }
}

/// Alice's SRTP datagrams to the SFU injected again, each three times: not
/// one is forwarded again. Returns how many were injected.
fn replays_are_not_forwarded(join: fn(&mut World, &str) -> usize) -> u64 {
    let mut world = World::new();
    let alice = join(&mut world, "alice");
    join(&mut world, "bob");
    world.run(Duration::from_secs(2));
    // Capture a few of alice's SRTP datagrams to the SFU as they pass.
    let captured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let (sfu, alice_addr, sink) = (world.sfu_addr, world.clients[alice].addr, captured.clone());
    world.loss = Some(Box::new(move |src, dst, data| {
        if src == alice_addr && dst == sfu && is_rtp(data) {
            sink.borrow_mut().push(data.to_vec());
        }
        false
    }));
    world.run(Duration::from_millis(200));
    world.loss = None;
    let replays = captured.borrow().clone();
    assert!(replays.len() > 5, "captured {}", replays.len());
    let forwarded = world.sfu.stats().packets_forwarded;
    let rejected = world.sfu.stats().drops(DropReason::Rejected);
    for datagram in &replays {
        for _ in 0..3 {
            world.inject(alice_addr, datagram);
        }
    }
    assert_eq!(
        world.sfu.stats().packets_forwarded,
        forwarded,
        "SRTP replay protection drops them"
    );
    let injected = world.sfu.stats().drops(DropReason::Rejected) - rejected;
    world.run(Duration::from_secs(1));
    assert!(
        world.sfu.stats().packets_forwarded > forwarded + 50,
        "alice's live media still flows"
    );
    injected
}

fn is_rtp(data: &[u8]) -> bool {
    data.len() > 12 && data[0] >> 6 == 2 && !(192..=223).contains(&data[1])
}

#[test]
fn replayed_media_is_not_forwarded_twice() {
    replays_are_not_forwarded(World::join);
}

#[test]
fn replayed_audio_the_sfu_opens_itself_is_a_counted_drop() {
    let injected = replays_are_not_forwarded(World::join_audio_only);
    assert!(injected >= 15, "each replay is counted as rejected: {injected}");
}

#[test]
fn voice_callers_audio_is_opened_by_the_sfu_which_reports_on_it() {
    let mut world = World::new();
    let alice = world.join_audio_only("alice");
    let bob = world.join_audio_only("bob");
    // Every tenth of alice's RTP datagrams to the SFU is lost.
    let (sfu, alice_addr) = (world.sfu_addr, world.clients[alice].addr);
    let mut n = 0u64;
    world.loss = Some(Box::new(move |src, dst, data| {
        if src == alice_addr && dst == sfu && is_rtp(data) {
            n += 1;
            return n.is_multiple_of(10);
        }
        false
    }));
    world.run(Duration::from_millis(17_500));
    let stats = world.sfu.stats();
    // ~870 a caller in 17.5 s: all opened by the SFU, none by str0m's path.
    assert!(stats.packets_opened > 1_500, "opened {}", stats.packets_opened);
    assert_eq!(stats.packets_forwarded, stats.packets_opened);
    assert_eq!(stats.drops(DropReason::Rejected), 0);
    let heard = world.received_from(bob)[&(user("alice"), MediaKind::Audio)]
        .packets
        .len();
    let said = world.received_from(alice)[&(user("bob"), MediaKind::Audio)]
        .packets
        .len();
    assert!(said > 800, "alice heard {said} of bob's");
    let ratio = heard as f64 / said as f64;
    assert!(
        (0.85..0.95).contains(&ratio),
        "bob heard {heard}: 90 % of what alice sent"
    );
    // Each caller's str0m read the SFU's receiver reports on what it sent.
    let audio = |i: usize| {
        let mid = world.clients[i].own_mids.0;
        world.clients[i].egress.get(&mid).cloned().expect("egress stats")
    };
    let (to_alice, to_bob) = (audio(alice), audio(bob));
    let remote = to_alice.remote.expect("alice got a report on her audio");
    let sent = *remote.maximum_sequence_number;
    // Reports 1, 6, 11 and 16 s after the first packet.
    assert!(sent > 700, "the last report covers what was sent: {sent}");
    let lost = remote.packets_lost as f64 / sent as f64;
    assert!((0.08..0.12).contains(&lost), "cumulative loss {lost}: a tenth");
    let fraction = to_alice.loss.expect("a fraction lost");
    assert!((0.06..0.14).contains(&fraction), "fraction lost {fraction}");
    assert_eq!(to_bob.remote.expect("bob got a report").packets_lost, 0);
    // The SFU echoed their sender reports: a round trip of twice the latency
    // (give or take the compact NTP format's 15 µs and str0m's clock mapping).
    let rtt = to_bob.rtt.expect("an RTT from LSR/DLSR");
    let within = Duration::from_millis(1);
    assert!(
        rtt + within >= 2 * common::LATENCY && rtt < 2 * common::LATENCY + within,
        "rtt {rtt:?}"
    );
}

#[test]
fn a_single_stream_caller_gets_the_active_speaker_on_its_own_m_lines() {
    let mut world = World::new();
    // Her own m-lines both ways (the bot's choice for a single-stream caller).
    world.own_lines = OwnLines::BothWays;
    let alice = world.join("alice");
    world.own_lines = OwnLines::PublishOnly;
    let bob = world.join("bob");
    let carol = world.join("carol");
    let now = world.now;
    let alice_session = world.clients[alice].session.expect("session");
    world.sfu.set_single_stream(now, alice_session);
    world.clients[bob].audio_level = 20;
    world.clients[carol].audio_level = 90;
    world.clients[alice].audio_level = 90;
    world.run(Duration::from_secs(3));
    let (audio_mid, video_mid) = world.clients[alice].own_mids;
    let recent_sources = |world: &World, mid, byte: usize| -> Vec<u8> {
        let since = world.now - Duration::from_millis(500);
        world.clients[alice].received.get(&mid).map_or(Vec::new(), |r| {
            r.packets
                .iter()
                .filter(|p| p.1 > since)
                .filter_map(|p| p.2.get(byte).copied())
                .collect()
        })
    };
    // Audio is the room's mix, re-encoded (see tests/single_stream.rs), not
    // anyone's forwarded packets (80 bytes starting 0xfc here).
    let mixed = |world: &World| {
        let packets = &world.clients[alice].received[&audio_mid].packets;
        !packets.is_empty() && packets.iter().all(|p| !(p.3 == 80 && p.2[0] == 0xfc))
    };
    assert!(mixed(&world), "alice hears the mix");
    let video = recent_sources(&world, video_mid, 10);
    assert!(
        !video.is_empty() && video.iter().all(|&who| who == bob as u8),
        "alice sees bob"
    );
    assert!(
        world.clients[alice].streams.is_empty(),
        "no renegotiation for a single-stream caller"
    );

    // Carol takes over.
    world.clients[bob].audio_level = 90;
    world.clients[carol].audio_level = 20;
    world.run(Duration::from_secs(3));
    assert!(mixed(&world), "alice hears the mix");
    let video = recent_sources(&world, video_mid, 10);
    assert!(
        !video.is_empty() && video.iter().all(|&who| who == carol as u8),
        "alice sees carol"
    );
    // One continuous stream on each of alice's m-lines across the switch.
    for mid in [audio_mid, video_mid] {
        let mut seqs: Vec<u64> = world.clients[alice].received[&mid]
            .packets
            .iter()
            .map(|p| p.0)
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs[seqs.len() - 1] - seqs[0] + 1, seqs.len() as u64, "no gap on {mid}");
    }
    // The others still get everyone, alice included.
    for i in [bob, carol] {
        let got = world.received_from(i);
        assert!(
            got.contains_key(&(user("alice"), MediaKind::Audio)),
            "client {i} receives alice"
        );
    }
}

/// The bot makes a version-0 caller single-stream right after opening its
/// session, before ICE and DTLS are up: it connects and receives all the same.
#[test]
fn a_single_stream_caller_set_before_it_connects() {
    let mut world = World::new();
    let bob = world.join("bob");
    world.run(Duration::from_secs(1));
    world.own_lines = OwnLines::BothWays;
    let alice = world.join("alice");
    let alice_session = world.clients[alice].session.expect("session");
    let now = world.now;
    world.sfu.set_single_stream(now, alice_session);
    world.clients[bob].audio_level = 90;
    world.run(Duration::from_secs(3));
    assert!(world.sfu.is_connected(alice_session), "alice connects");
    let (audio_mid, video_mid) = world.clients[alice].own_mids;
    for mid in [audio_mid, video_mid] {
        let got = world.clients[alice].received.get(&mid).map_or(0, |r| r.packets.len());
        assert!(got > 20, "alice receives on her own m-line {mid}: {got}");
    }
    let from_alice = world.received_from(bob);
    assert!(
        from_alice.values().map(|r| r.packets.len()).sum::<usize>() > 40,
        "bob receives alice"
    );
}

/// The bot calls someone: the session starts from the SFU's offer. What the
/// callee sends on the offered m-lines is published, and the room's streams
/// reach it by renegotiation like anyone else's.
#[test]
fn a_session_the_sfu_offers_publishes_and_subscribes() {
    let mut world = World::new();
    let bob = world.join("bob");
    let carol = world.join_called("carol");
    world.run(Duration::from_secs(3));
    let carol_session = world.clients[carol].session.expect("session");
    assert!(world.sfu.is_connected(carol_session), "carol connects");
    for (me, other) in [(bob, "@carol:test"), (carol, "@bob:test")] {
        let got = world.received_from(me);
        for kind in [MediaKind::Audio, MediaKind::Video] {
            let n = got.get(&(other.to_string(), kind)).map_or(0, |r| r.packets.len());
            assert!(n > 40, "{} receives {other}'s {kind}: {n}", world.clients[me].name);
        }
    }
    // The renegotiation that brought bob turned our first offer's m-lines
    // receive-only: carol only sends there now (no silent stream of ours).
    let (audio, video) = world.clients[carol].own_mids;
    let directions =
        |world: &World| [audio, video].map(|mid| world.clients[carol].rtc.media(mid).expect("m-line").direction());
    assert_eq!(directions(&world), [str0m::media::Direction::SendOnly; 2]);
    // Her own offer (a browser keeps those transceivers `sendrecv`) does not
    // bring our silent stream back, and everyone still gets everyone.
    world.reoffer_two_way(carol);
    world.run(Duration::from_secs(1));
    assert_eq!(directions(&world), [str0m::media::Direction::SendOnly; 2]);
    let before = world.received_from(bob)[&("@carol:test".to_string(), MediaKind::Audio)]
        .packets
        .len();
    world.run(Duration::from_secs(1));
    let after = world.received_from(bob)[&("@carol:test".to_string(), MediaKind::Audio)]
        .packets
        .len();
    assert!(after > before + 20, "bob still receives carol: {before} → {after}");
}

/// A called client that cannot renegotiate (it answered with version 0) gets
/// the others' media on the offer's own m-lines.
#[test]
fn a_called_single_stream_client_receives_on_the_offered_m_lines() {
    let mut world = World::new();
    let bob = world.join("bob");
    world.run(Duration::from_secs(1));
    let carol = world.join_called("carol");
    let carol_session = world.clients[carol].session.expect("session");
    let now = world.now;
    world.sfu.set_single_stream(now, carol_session);
    world.clients[bob].audio_level = 90;
    world.run(Duration::from_secs(3));
    let (audio_mid, video_mid) = world.clients[carol].own_mids;
    for mid in [audio_mid, video_mid] {
        let got = world.clients[carol].received.get(&mid).map_or(0, |r| r.packets.len());
        assert!(got > 20, "carol receives on the offered m-line {mid}: {got}");
    }
    assert!(world.clients[carol].streams.is_empty(), "no renegotiation");
}

#[test]
fn a_storm_of_due_timers_is_run_in_slices() {
    let mut world = World::new();
    for i in 0..40 {
        world.join_receive_only(&format!("listener{i}"));
    }
    world.run(Duration::from_secs(2));
    assert_eq!(world.sfu.stats().sessions, 40);
    // Far enough ahead that every session's timer is due at once.
    let later = world.now + Duration::from_secs(5);
    let mut calls = 0;
    let mut ran = Vec::new();
    while world.sfu.poll_timeout().is_some_and(|at| at <= later) && calls < 100 {
        let before = world.sfu.stats().session_timeouts;
        world.sfu.handle_timeout(later);
        while world.sfu.poll_transmit().is_some() {}
        ran.push(world.sfu.stats().session_timeouts - before);
        calls += 1;
    }
    assert!(ran.iter().all(|&n| n <= 32), "timers per call: {ran:?}");
    assert!(ran.iter().sum::<u64>() >= 40, "every session ran: {ran:?}");
    assert!(ran.len() >= 2, "the storm took more than one call: {ran:?}");
}

/// A multi-stream caller's own m-lines are answered `recvonly`, with no
/// stream of ours on them (matrix-js-sdk makes a feed of every received stream
/// and needs each labelled); it still receives the others on the SFU's
/// m-lines, and they receive it.
#[test]
fn a_publish_only_callers_own_m_lines_are_answered_receive_only() {
    let now = std::time::Instant::now();
    let mut sfu = switchboard_sfu::Sfu::new(switchboard_sfu::SfuConfig::new("127.0.0.1:3000".parse().expect("addr")));
    let mut client = str0m::RtcConfig::new().build(now);
    client.add_local_candidate(str0m::Candidate::host("127.0.0.1:5000".parse().expect("addr"), "udp").expect("host"));
    let mut api = client.sdp_api();
    for kind in [MediaKind::Audio, MediaKind::Video] {
        api.add_media(kind, str0m::media::Direction::SendRecv, Some("cam".into()), None, None);
    }
    let (offer, _) = api.apply().expect("offer");
    let who = switchboard_sfu::Participant {
        user_id: "@x:test".into(),
        device_id: "X".into(),
    };
    let room = switchboard_sfu::RoomId("!r:test".into());
    let (_, answer) = sfu
        .open_session(now, room, who, &offer.to_sdp_string(), OwnLines::PublishOnly)
        .expect("open");
    let sections: Vec<&str> = answer.split("\r\nm=").skip(1).collect();
    assert_eq!(sections.len(), 2, "{answer}");
    for section in sections {
        assert!(section.contains("a=recvonly"), "{section}");
        assert!(!section.contains("a=ssrc:"), "no stream of ours: {section}");
    }
    let mut world = World::new();
    let bob = world.join("bob");
    let alice = world.join("alice");
    world.run(Duration::from_secs(3));
    for (me, other) in [(alice, bob), (bob, alice)] {
        let got = world.received_from(me);
        for kind in [MediaKind::Audio, MediaKind::Video] {
            let name = if other == alice { "alice" } else { "bob" };
            let received = got
                .get(&(user(name), kind))
                .unwrap_or_else(|| panic!("{me} got no {kind} from {name}"));
            assert!(received.packets.len() > 20, "{me}: {kind} from {name}");
        }
    }
}

/// A publisher that stops sending on one of its m-lines (a screen share
/// ended, a camera removed) unpublishes that track: the others' m-lines for
/// it turn inactive, its other track goes on.
#[test]
fn a_track_whose_publisher_stops_sending_leaves_the_room() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    world.run(Duration::from_secs(3));
    assert_eq!(world.sfu.stats().tracks, 4);
    let (audio, video) = world.clients[alice].own_mids;
    world.reoffer(
        alice,
        [
            (audio, str0m::media::Direction::SendOnly),
            (video, str0m::media::Direction::Inactive),
        ],
    );
    world.run(Duration::from_secs(1));
    assert_eq!(world.sfu.stats().tracks, 3, "her video is gone, her audio stays");
    let alices = |world: &World, kind| world.received_from(bob)[&(user("alice"), kind)].packets.len();
    let (audio_before, video_before) = (alices(&world, MediaKind::Audio), alices(&world, MediaKind::Video));
    world.run(Duration::from_secs(2));
    assert!(
        alices(&world, MediaKind::Audio) > audio_before + 50,
        "bob still hears alice"
    );
    assert_eq!(alices(&world, MediaKind::Video), video_before, "no more of her video");
    // Bob's m-line for it was renegotiated inactive.
    let client = &world.clients[bob];
    let inactive = client
        .received
        .iter()
        .filter(|(_, r)| r.kind == Some(MediaKind::Video))
        .filter(|(mid, _)| client.rtc.media(**mid).map(|m| m.direction()) == Some(str0m::media::Direction::Inactive))
        .count();
    assert_eq!(inactive, 1, "bob's m-line for alice's video");
    // She sends video again on the same m-line (a screen share restarted on
    // its transceiver): published again, bob gets it again.
    world.reoffer(
        alice,
        [
            (audio, str0m::media::Direction::SendOnly),
            (video, str0m::media::Direction::SendOnly),
        ],
    );
    world.run(Duration::from_secs(1));
    assert_eq!(world.sfu.stats().tracks, 4, "her video is back");
    let alices_video_total = |world: &World| {
        let client = &world.clients[bob];
        client
            .received
            .values()
            .filter(|r| r.kind == Some(MediaKind::Video))
            .filter(|r| {
                client
                    .streams
                    .iter()
                    .any(|s| s.stream_id == r.stream_id && s.publisher.user_id == user("alice"))
            })
            .map(|r| r.packets.len())
            .sum::<usize>()
    };
    let resumed = alices_video_total(&world);
    world.run(Duration::from_secs(1));
    assert!(alices_video_total(&world) > resumed + 20, "bob gets her video again");
}

/// Bob's packets from alice's audio, over every m-line it came on.
fn heard_from(world: &World, listener: usize, speaker: &str) -> usize {
    let client = &world.clients[listener];
    client
        .received
        .values()
        .filter(|r| r.kind == Some(MediaKind::Audio))
        .filter(|r| {
            client
                .streams
                .iter()
                .any(|s| s.stream_id == r.stream_id && s.publisher.user_id == user(speaker))
        })
        .map(|r| r.packets.len())
        .sum()
}

#[test]
fn a_voice_callers_audio_stopped_and_sent_again_is_opened_again() {
    let mut world = World::new();
    let alice = world.join_audio_only("alice");
    let bob = world.join_audio_only("bob");
    world.run(Duration::from_secs(2));
    let audio = world.clients[alice].own_mids.0;
    world.reoffer(alice, [(audio, str0m::media::Direction::Inactive); 2]);
    world.run(Duration::from_secs(1));
    assert_eq!(world.sfu.stats().tracks, 1, "her audio is gone");
    // Sent again on the same m-line: a new track, the same SSRC.
    world.reoffer(alice, [(audio, str0m::media::Direction::SendOnly); 2]);
    world.run(Duration::from_secs(1));
    assert_eq!(world.sfu.stats().tracks, 2, "her audio is back");
    let resumed = heard_from(&world, bob, "alice");
    let opened = world.sfu.stats().packets_opened;
    world.run(Duration::from_secs(1));
    assert!(heard_from(&world, bob, "alice") > resumed + 40, "bob hears her again");
    assert!(world.sfu.stats().packets_opened > opened + 80, "both opened by the SFU");
}

/// A client that reuses one of the SFU's receive-only m-lines to send a new
/// track (a browser's `addTrack` takes a transceiver that never sent, as
/// matrix-js-sdk's screen share does) publishes it; the m-line keeps
/// bringing what it carried, and when that goes away it stays open for the
/// client's track.
#[test]
fn a_receive_only_m_line_reused_to_publish_is_a_new_track() {
    let mut world = World::new();
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    world.run(Duration::from_secs(3));
    assert_eq!(world.sfu.stats().tracks, 6);
    let bobs_video = |world: &World| {
        let client = &world.clients[alice];
        let stream = client
            .streams
            .iter()
            .find(|s| s.publisher.user_id == user("bob") && s.video)
            .map(|s| s.stream_id.clone())
            .expect("alice receives bob's video");
        client
            .received
            .iter()
            .find(|(_, r)| r.kind == Some(MediaKind::Video) && r.stream_id == stream)
            .map(|(mid, r)| (*mid, r.packets.len()))
            .expect("bob's video m-line at alice")
    };
    let (reused, _) = bobs_video(&world);
    world.reuse_for_video(alice, reused);
    world.run(Duration::from_secs(2));
    assert_eq!(world.sfu.stats().tracks, 7, "what alice sends there is a track");
    let alices_new = |world: &World| {
        let client = &world.clients[carol];
        let streams: Vec<&str> = client
            .streams
            .iter()
            .filter(|s| s.publisher.user_id == user("alice") && s.video)
            .map(|s| s.stream_id.as_str())
            .collect();
        assert_eq!(streams.len(), 2, "carol receives alice's camera and her new track");
        client
            .received
            .values()
            .filter(|r| r.kind == Some(MediaKind::Video) && streams.contains(&r.stream_id.as_str()))
            .map(|r| r.packets.len())
            .max()
            .unwrap_or(0)
    };
    let before = alices_new(&world);
    assert!(before > 20, "carol gets alice's new track: {before}");
    let (_, bobs_before) = bobs_video(&world);
    world.run(Duration::from_secs(1));
    let (mid, bobs_after) = bobs_video(&world);
    assert_eq!(mid, reused);
    assert!(bobs_after > bobs_before + 20, "alice still gets bob's video there");
    // Bob leaves: the m-line stays open for alice's track (only we stop sending).
    world.leave(bob);
    world.run(Duration::from_secs(2));
    let direction = world.clients[alice].rtc.media(reused).map(|m| m.direction());
    assert_eq!(direction, Some(str0m::media::Direction::SendOnly));
    let after = alices_new(&world);
    assert!(
        after > before + 40,
        "carol still gets alice's track: {before} → {after}"
    );
}

/// The m-sections of `sdp` as (mid, direction, msid stream id).
fn sections(sdp: &str) -> Vec<(String, String, Option<String>)> {
    sdp.split("\nm=")
        .skip(1)
        .map(|section| {
            let attr = |prefix: &str| {
                section
                    .lines()
                    .find_map(|l| l.trim_end().strip_prefix(prefix).map(str::to_string))
            };
            let direction = ["sendrecv", "sendonly", "recvonly", "inactive"]
                .into_iter()
                .find(|d| section.lines().any(|l| l.trim_end() == format!("a={d}")))
                .unwrap_or_default();
            let stream = attr("a=msid:").and_then(|m| m.split_whitespace().next().map(str::to_string));
            (attr("a=mid:").unwrap_or_default(), direction.to_string(), stream)
        })
        .collect()
}

/// The mids of `sdp`'s m-sections in `direction`, labelled `stream` if one is given.
fn mids(sdp: &str, direction: &str, stream: Option<&str>) -> Vec<String> {
    sections(sdp)
        .into_iter()
        .filter(|(_, d, s)| d == direction && stream.is_none_or(|stream| s.as_deref() == Some(stream)))
        .map(|(mid, _, _)| mid)
        .collect()
}

#[test]
fn joins_and_leaves_take_over_idle_m_lines_instead_of_adding_more() {
    let mut world = World::new();
    let amy = world.join("amy");
    let bob = world.join("bob");
    world.run(Duration::from_secs(2));
    let mut guest_mids = std::collections::BTreeSet::new();
    let mut first_offer = 0;
    for round in 0..12 {
        let name = format!("guest{round}");
        let guest = world.join(&name);
        let joined_at = world.now;
        world.run(Duration::from_millis(1500));
        let client = &world.clients[amy];
        let stream = client
            .streams
            .iter()
            .find(|s| s.publisher.user_id == user(&name))
            .map(|s| s.stream_id.clone())
            .expect("amy is told of the guest's stream");
        // The guest's audio and video come on two m-lines labelled with its stream.
        let labelled = mids(&client.last_offer, "sendonly", Some(&stream));
        assert_eq!(labelled.len(), 2, "round {round}: {}", client.last_offer);
        for mid in &labelled {
            let received = &client.received[&str0m::media::Mid::from(mid.as_str())];
            let fresh = received.packets.iter().filter(|p| p.1 > joined_at).count();
            assert!(
                fresh > 20,
                "round {round}: {fresh} packets of the guest on m-line {mid}"
            );
            // One stream on the m-line from its first track on: the numbering
            // never goes back (the SRTP index would be a replay otherwise).
            let back: Vec<(u64, u64)> = received
                .packets
                .windows(2)
                .filter(|w| w[1].0 <= w[0].0)
                .map(|w| (w[0].0, w[1].0))
                .collect();
            assert!(
                back.is_empty(),
                "round {round}: sequence numbers on m-line {mid} go back: {back:?}"
            );
            guest_mids.insert(mid.clone());
        }
        if round == 0 {
            first_offer = client.last_offer.len();
        }
        world.leave(guest);
        world.run(Duration::from_millis(500));
    }
    // Twelve guests came and went on the same two m-lines: amy's SDP has
    // her own two, bob's two and those, and is no longer than at the start.
    assert_eq!(guest_mids.len(), 2, "{guest_mids:?}");
    let last = &world.clients[amy].last_offer;
    assert_eq!(sections(last).len(), 6, "{last}");
    assert!(
        last.len() <= first_offer + 64,
        "{} bytes, was {first_offer}",
        last.len()
    );
    // Bob's media was never disturbed.
    let from_bob = world.received_from(amy);
    let bob_audio = &from_bob[&(user("bob"), MediaKind::Audio)];
    assert!(
        bob_audio.packets.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "bob's audio has gaps"
    );
    let _ = bob;
}

#[test]
fn an_offer_crossing_ours_leaves_the_m_line_it_took_over_idle_for_the_next() {
    let mut world = World::new();
    let amy = world.join("amy");
    world.run(Duration::from_secs(1));
    let first = world.join("guest0");
    world.run(Duration::from_secs(1));
    world.leave(first);
    world.run(Duration::from_millis(500));
    let idle = mids(&world.clients[amy].last_offer, "inactive", None);
    assert_eq!(idle.len(), 2, "{}", world.clients[amy].last_offer);
    // A second guest joins; our offer to amy takes over the idle m-lines, but
    // amy's own offer crosses it (glare): ours is dropped, hers answered.
    world.hold_offers = true;
    world.join("guest1");
    world.run(Duration::from_millis(300));
    let session = world.clients[amy].session.expect("amy's session");
    let ours = world
        .sfu
        .create_offer(world.now, session)
        .expect("offer")
        .expect("an offer");
    let taken: Vec<String> = mids(&ours.sdp, "sendonly", None)
        .into_iter()
        .filter(|mid| idle.contains(mid))
        .collect();
    assert_eq!(taken.len(), 2, "our offer takes over both: {}", ours.sdp);
    world.hold_offers = false;
    world.reoffer_two_way(amy);
    let taken_again = world.now;
    world.run(Duration::from_secs(1));
    // Our next offer takes them over again: the guest arrives there, and amy
    // has no more m-lines than before.
    let client = &world.clients[amy];
    let guest_stream = client
        .streams
        .iter()
        .find(|s| s.publisher.user_id == user("guest1"))
        .map(|s| s.stream_id.clone())
        .expect("amy is told of guest1");
    let labelled = mids(&client.last_offer, "sendonly", Some(&guest_stream));
    assert_eq!(labelled, idle, "{}", client.last_offer);
    assert_eq!(sections(&client.last_offer).len(), 4);
    for mid in &labelled {
        let received = &client.received[&str0m::media::Mid::from(mid.as_str())];
        let fresh = received.packets.iter().filter(|p| p.1 > taken_again).count();
        assert!(fresh > 20, "{fresh} packets of guest1 on {mid}");
    }
}
/// A guest came and went: amy's two m-lines for it are idle.
fn amy_with_two_idle_m_lines() -> (World, usize, Vec<String>) {
    let mut world = World::new();
    let amy = world.join("amy");
    world.run(Duration::from_secs(1));
    let guest = world.join("guest0");
    world.run(Duration::from_secs(1));
    world.leave(guest);
    world.run(Duration::from_millis(500));
    let idle = mids(&world.clients[amy].last_offer, "inactive", None);
    assert_eq!(idle.len(), 2, "{}", world.clients[amy].last_offer);
    (world, amy, idle)
}

/// Amy offers to send audio and `video` on the m-line `mid` (of ours, taken by
/// her addTrack or given back): the SFU's answer, her pending offer, and that
/// m-line's section of the answer.
fn amy_offers_video_on(
    world: &mut World,
    amy: usize,
    mid: &str,
    video: str0m::media::Direction,
) -> (String, str0m::change::SdpPendingOffer, (String, String, Option<String>)) {
    let session = world.clients[amy].session.expect("amy's session");
    let (audio, _) = world.clients[amy].own_mids;
    let mut api = world.clients[amy].rtc.sdp_api();
    api.set_direction(audio, str0m::media::Direction::SendOnly);
    api.set_direction(str0m::media::Mid::from(mid), video);
    let (offer, pending) = api.apply().expect("an offer");
    let answer = world
        .sfu
        .accept_offer(world.now, session, &offer.to_sdp_string())
        .expect("answered");
    let line = sections(&answer)
        .into_iter()
        .find(|(m, _, _)| m == mid)
        .expect("the m-line");
    (answer, pending, line)
}

#[test]
fn an_m_line_taken_for_a_track_that_left_before_the_answer_is_idle_again() {
    let (mut world, amy, idle) = amy_with_two_idle_m_lines();
    world.hold_offers = true;
    let guest = world.join("guest1");
    world.run(Duration::from_millis(300));
    let session = world.clients[amy].session.expect("amy's session");
    let ours = world
        .sfu
        .create_offer(world.now, session)
        .expect("offer")
        .expect("an offer");
    // guest1 leaves while our offer taking over the idle m-lines is out.
    world.leave(guest);
    let answer = world.clients[amy]
        .rtc
        .sdp_api()
        .accept_offer(str0m::change::SdpOffer::from_sdp_string(&ours.sdp).expect("offer parses"))
        .expect("amy accepts");
    world
        .sfu
        .accept_answer(world.now, session, &answer.to_sdp_string())
        .expect("the SFU accepts");
    world.hold_offers = false;
    world.renegotiate(session);
    world.run(Duration::from_secs(1));
    world.join("guest2");
    world.run(Duration::from_secs(1));
    let last = sections(&world.clients[amy].last_offer);
    assert_eq!(last.len(), 4, "guest2 takes over the same two m-lines: {last:?}");
    assert_eq!(mids(&world.clients[amy].last_offer, "sendonly", None), idle);
}

#[test]
fn m_lines_made_inactive_in_an_answer_to_a_crossing_offer_can_be_taken_over() {
    let mut world = World::new();
    let amy = world.join("amy");
    world.run(Duration::from_secs(1));
    let guest = world.join("guest0");
    world.run(Duration::from_secs(1));
    // Our offer turning guest0's m-lines inactive crosses amy's own offer.
    world.hold_offers = true;
    world.leave(guest);
    world.run(Duration::from_millis(300));
    let session = world.clients[amy].session.expect("amy's session");
    let ours = world
        .sfu
        .create_offer(world.now, session)
        .expect("offer")
        .expect("an offer");
    assert_eq!(mids(&ours.sdp, "inactive", None).len(), 2);
    world.hold_offers = false;
    world.reoffer_two_way(amy);
    world.run(Duration::from_secs(1));
    world.join("guest1");
    world.run(Duration::from_secs(1));
    let last = sections(&world.clients[amy].last_offer);
    assert_eq!(last.len(), 4, "guest1 takes over the m-lines guest0 left: {last:?}");
}

#[test]
fn a_crossing_offer_sending_on_a_taken_m_line_is_answered_receive_only() {
    let (mut world, amy, idle) = amy_with_two_idle_m_lines();
    world.hold_offers = true;
    world.join("guest1");
    world.run(Duration::from_millis(300));
    let session = world.clients[amy].session.expect("amy's session");
    let ours = world
        .sfu
        .create_offer(world.now, session)
        .expect("offer")
        .expect("an offer");
    let guest_stream = ours
        .streams
        .iter()
        .find(|s| s.publisher.user_id == user("guest1"))
        .map(|s| s.stream_id.clone())
        .expect("guest1's stream");
    world.hold_offers = false;
    // Amy's offer crosses ours: she sends on the idle video m-line (addTrack
    // takes a transceiver that never sent), which our offer had taken over.
    let (_, _, line) = amy_offers_video_on(&mut world, amy, &idle[1], str0m::media::Direction::SendRecv);
    assert_eq!(line.1, "recvonly", "we send nothing there: {line:?}");
    assert_ne!(
        line.2.as_deref(),
        Some(guest_stream.as_str()),
        "not labelled with guest1's stream"
    );
}

#[test]
fn an_idle_m_line_the_peer_sent_on_and_stopped_goes_inactive_and_is_taken_over_later() {
    let (mut world, amy, idle) = amy_with_two_idle_m_lines();
    // Amy sends her video on the idle video m-line (addTrack took it)...
    let video = str0m::media::Mid::from(idle[1].as_str());
    world.reuse_for_video(amy, video);
    world.run(Duration::from_secs(1));
    // ...and stops: her transceiver is receive-only again. We send nothing
    // there, so our answer says inactive (str0m alone would say sendonly: a
    // track without packets).
    world.clients[amy].send_video = false;
    let (answer, pending, line) = amy_offers_video_on(&mut world, amy, &idle[1], str0m::media::Direction::RecvOnly);
    assert_eq!(line.1, "inactive", "{line:?}");
    world.clients[amy]
        .rtc
        .sdp_api()
        .accept_answer(
            pending,
            str0m::change::SdpAnswer::from_sdp_string(&answer).expect("answer"),
        )
        .expect("amy accepts");
    world.run(Duration::from_secs(1));
    // The next guest's video comes there.
    world.join("guest1");
    world.run(Duration::from_secs(1));
    let last = sections(&world.clients[amy].last_offer);
    assert_eq!(last.len(), 4, "{last:?}");
    assert_eq!(mids(&world.clients[amy].last_offer, "sendonly", None), idle);
}

#[test]
fn a_long_conference_of_comings_and_goings_keeps_every_sdp_bounded() {
    let mut world = World::new();
    let host = world.join("host");
    world.run(Duration::from_secs(1));
    // A fixed pseudo-random order of joins and leaves (xorshift), up to five guests at once.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut present: Vec<(usize, String)> = Vec::new();
    let mut most = 0;
    for step in 0..60 {
        let r = random();
        if present.len() < 2 || (present.len() < 5 && r % 2 == 0) {
            let name = format!("guest{step}");
            present.push((world.join(&name), name));
        } else {
            let (guest, _) = present.swap_remove((r / 2) as usize % present.len());
            world.leave(guest);
        }
        most = most.max(present.len());
        world.run(Duration::from_millis(400));
    }
    let last_change = world.now;
    world.run(Duration::from_secs(1));
    // The host's m-lines: her own two and two per guest at the busiest moment.
    let client = &world.clients[host];
    let lines = sections(&client.last_offer);
    assert!(
        lines.len() <= 2 + 2 * most,
        "{} m-lines, at most {most} guests at once",
        lines.len()
    );
    // Everyone there now reaches her: on two m-lines labelled with their stream, packets arriving.
    for (_, name) in &present {
        let stream = client
            .streams
            .iter()
            .find(|s| s.publisher.user_id == user(name))
            .map(|s| s.stream_id.clone())
            .unwrap_or_else(|| panic!("the host is told of {name}"));
        let labelled = mids(&client.last_offer, "sendonly", Some(&stream));
        assert_eq!(labelled.len(), 2, "{name}: {lines:?}");
        for mid in &labelled {
            let received = &client.received[&str0m::media::Mid::from(mid.as_str())];
            let fresh = received.packets.iter().filter(|p| p.1 > last_change).count();
            assert!(fresh > 20, "{name} on {mid}: {fresh} packets in the last second");
            assert!(
                received.packets.windows(2).all(|w| w[1].0 > w[0].0),
                "{name} on {mid}: numbering went back"
            );
        }
    }
}

#[test]
fn bandwidth_is_estimated_where_simulcast_layers_are_chosen() {
    // A room without simulcast: video sessions keep transport-wide sequence
    // numbers (the publishers' browsers estimate their uplink from our
    // feedback) but we run no estimator of our own.
    let mut world = World::new();
    let plain = [world.join("alice"), world.join("bob")];
    world.run(Duration::from_secs(3));
    for &i in &plain {
        let client = &world.clients[i];
        let session = client.session.expect("session");
        let stats = world.sfu.session_stats(session).expect("stats");
        assert_eq!(stats.egress_estimate_bps, None, "{}", client.name);
        let extensions = client
            .rtc
            .media(client.own_mids.1)
            .expect("video m-line")
            .remote_extmap();
        assert!(
            extensions
                .id_of(str0m::rtp::Extension::TransportSequenceNumber)
                .is_some(),
            "{}: transport-wide sequence numbers negotiated",
            client.name
        );
    }
    // A room where someone publishes simulcast: who opens there estimates.
    world.room = switchboard_sfu::RoomId("!layers:test".into());
    world.join_with("carol", true);
    let dave = world.join("dave");
    world.run(Duration::from_secs(3));
    let session = world.clients[dave].session.expect("session");
    let estimate = world.sfu.session_stats(session).expect("stats").egress_estimate_bps;
    assert!(estimate.is_some_and(|bps| bps > 0), "dave's estimate: {estimate:?}");
}
