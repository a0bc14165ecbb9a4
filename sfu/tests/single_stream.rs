//! Single-stream sessions in virtual time: real str0m peers sending real opus
//! tones; what a single-stream caller hears is decoded and analysed by
//! frequency, what it sees is checked packet by packet.

mod common;

use common::World;
use mixer::analysis::tone_amplitude;
use std::time::Duration;
use str0m::media::MediaKind;
use switchboard_sfu::{OwnLines, SfuEvent};

/// The amplitude of each frequency in the last second `index` heard.
fn heard(world: &World, index: usize, freqs: &[f32]) -> Vec<f32> {
    let pcm = &world.clients[index].heard;
    assert!(
        pcm.len() >= 48_000,
        "{} heard only {} samples",
        world.clients[index].name,
        pcm.len()
    );
    let tail = &pcm[pcm.len() - 48_000..];
    freqs.iter().map(|f| tone_amplitude(tail, *f, 48_000.0)).collect()
}

fn single_stream(world: &mut World, index: usize) {
    let now = world.now;
    let session = world.clients[index].session.expect("session");
    world.sfu.set_single_stream(now, session);
    world.clients[index].listen = true;
}

#[test]
fn single_stream_callers_hear_everyone_but_themselves() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let freqs = [440.0, 660.0, 1000.0];
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let index = world.join(name);
        world.clients[index].tone = Some((freqs[i], 0.25));
        world.clients[index].audio_level = 25;
        single_stream(&mut world, index);
    }
    world.run(Duration::from_secs(3));
    for i in 0..3 {
        let amplitudes = heard(&world, i, &freqs);
        for (j, amplitude) in amplitudes.iter().enumerate() {
            if i == j {
                assert!(*amplitude < 0.01, "client {i} hears itself: {amplitudes:?}");
            } else {
                assert!(*amplitude > 0.15, "client {i} misses {} Hz: {amplitudes:?}", freqs[j]);
            }
        }
        // One continuous stream on its own audio m-line.
        let mid = world.clients[i].own_mids.0;
        let mut seqs: Vec<u64> = world.clients[i].received[&mid].packets.iter().map(|p| p.0).collect();
        seqs.dedup();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gaps in the mix");
        let rtp = &world.clients[i].received[&mid].rtp;
        assert!(
            rtp.windows(2)
                .all(|w| w[1].0 == w[0].0 && w[1].1.wrapping_sub(w[0].1) == 960),
            "one SSRC, 20 ms of timestamp a packet"
        );
        assert!(world.clients[i].streams.is_empty(), "no renegotiation");
    }
    let stats = world.sfu.mixer_stats(&world.room).expect("the room mixes");
    assert_eq!(stats.decode_errors, 0);
    assert!(
        stats.encoded <= 4 * stats.ticks,
        "one encode per distinct mix: {stats:?}"
    );
}

#[test]
fn with_five_speakers_a_listener_hears_the_loudest_three() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let freqs = [400.0, 550.0, 700.0, 850.0, 1000.0];
    let levels = [20, 25, 30, 45, 50];
    for i in 0..5 {
        let index = world.join(&format!("speaker{i}"));
        world.clients[index].tone = Some((freqs[i], 0.2));
        world.clients[index].audio_level = levels[i];
    }
    let listener = world.join("listener");
    world.clients[listener].tone = Some((300.0, 0.0));
    world.clients[listener].audio_level = 127;
    single_stream(&mut world, listener);
    world.run(Duration::from_secs(3));
    let amplitudes = heard(&world, listener, &freqs);
    for (i, amplitude) in amplitudes.iter().enumerate() {
        if i < 3 {
            assert!(*amplitude > 0.1, "{} Hz should be heard: {amplitudes:?}", freqs[i]);
        } else {
            assert!(*amplitude < 0.01, "{} Hz should not be heard: {amplitudes:?}", freqs[i]);
        }
    }
}

#[test]
fn a_v0_caller_and_two_multi_stream_callers_receive_each_other() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let freqs = [440.0, 660.0, 1000.0];
    let names = ["alice", "bob", "carol"];
    for (i, name) in names.into_iter().enumerate() {
        let index = world.join(name);
        world.clients[index].tone = Some((freqs[i], 0.25));
        world.clients[index].audio_level = 25 + i as i8;
    }
    single_stream(&mut world, 0);
    world.run(Duration::from_secs(3));
    // Alice (single stream) hears a mix of bob and carol.
    let amplitudes = heard(&world, 0, &freqs);
    assert!(
        amplitudes[0] < 0.01 && amplitudes[1] > 0.15 && amplitudes[2] > 0.15,
        "{amplitudes:?}"
    );
    let video = &world.clients[0].received[&world.clients[0].own_mids.1];
    assert!(video.packets.len() > 40, "alice sees someone");
    // Bob and carol receive everyone, alice included, one stream each.
    for me in [1, 2] {
        let got = world.received_from(me);
        for other in names.iter().filter(|n| **n != names[me]) {
            for kind in [MediaKind::Audio, MediaKind::Video] {
                let n = got
                    .get(&(format!("@{other}:test"), kind))
                    .map_or(0, |r| r.packets.len());
                assert!(n > 40, "{} receives {other}'s {kind}: {n}", names[me]);
            }
        }
    }
}

#[test]
fn video_follows_the_speaker_after_the_hold_off_on_a_keyframe_with_continuous_numbers() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    single_stream(&mut world, alice);
    world.clients[alice].audio_level = 90;
    world.clients[bob].audio_level = 20;
    world.clients[carol].audio_level = 90;
    // Keyframes only on request.
    world.clients[carol].keyframe_every = 0;
    world.run(Duration::from_secs(3));
    let video_mid = world.clients[alice].own_mids.1;
    let source = |head: &[u8]| head.get(10).copied();
    let last = world.clients[alice].received[&video_mid]
        .packets
        .last()
        .cloned()
        .expect("video");
    assert_eq!(source(&last.2), Some(bob as u8), "alice sees bob");

    // Carol takes the floor.
    let requests_before = world.clients[carol].keyframe_requests;
    world.clients[bob].audio_level = 90;
    world.clients[carol].audio_level = 20;
    let switched_at = world.now;
    world.run(Duration::from_secs(3));
    let speaker_at = world
        .events
        .iter()
        .find(|(at, e)| *at >= switched_at && matches!(e, SfuEvent::ActiveSpeaker { .. }))
        .map(|(at, _)| *at)
        .expect("the speaker changed");
    let packets = &world.clients[alice].received[&video_mid].packets;
    let first = packets
        .iter()
        .find(|p| source(&p.2) == Some(carol as u8))
        .expect("alice sees carol");
    let hold_off = world.sfu.config().video_hold_off;
    assert!(
        first.1 >= speaker_at + hold_off,
        "video switched {:?} after the speaker changed, before the hold-off {hold_off:?}",
        first.1 - speaker_at
    );
    assert!(first.1 - switched_at < Duration::from_secs(2), "but promptly");
    assert_eq!(first.2[0] & 0x10, 0x10, "starts a frame");
    assert_eq!(first.2[1] & 0x01, 0, "on a keyframe");
    assert!(
        world.clients[carol].keyframe_requests > requests_before,
        "requested on the switch"
    );
    // After the switch, only carol; sequence numbers continuous throughout.
    let after: Vec<_> = packets.iter().filter(|p| p.1 > first.1).collect();
    assert!(!after.is_empty() && after.iter().all(|p| source(&p.2) == Some(carol as u8)));
    let mut seqs: Vec<u64> = packets.iter().map(|p| p.0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs[seqs.len() - 1] - seqs[0] + 1,
        seqs.len() as u64,
        "no gap in alice's video"
    );
    // One SSRC, and timestamps that move on with the wall clock across the switch.
    let received = &world.clients[alice].received[&video_mid];
    assert!(
        received.rtp.iter().all(|(ssrc, _)| *ssrc == received.rtp[0].0),
        "one SSRC"
    );
    let switch = packets.iter().position(|p| p.1 == first.1).expect("the switch");
    let (before, after) = (received.rtp[switch - 1].1, received.rtp[switch].1);
    let elapsed = (first.1 - packets[switch - 1].1).as_secs_f64() * 90_000.0;
    let step = f64::from(after.wrapping_sub(before));
    assert!(
        step > 0.0 && (step - elapsed).abs() < 90.0 * 5.0,
        "timestamp step {step} over {elapsed} ticks of wall clock"
    );
}

#[test]
fn a_brief_interruption_does_not_move_the_video() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    single_stream(&mut world, alice);
    world.clients[alice].audio_level = 90;
    world.clients[bob].audio_level = 20;
    world.clients[carol].audio_level = 90;
    world.run(Duration::from_secs(3));
    // Carol cuts in, long enough to take the floor, not long enough to keep it
    // for the hold-off.
    world.clients[carol].audio_level = 5;
    world.clients[bob].audio_level = 40;
    let from = world.now;
    world.run(Duration::from_millis(400));
    world.clients[carol].audio_level = 90;
    world.clients[bob].audio_level = 20;
    world.run(Duration::from_secs(2));
    let cut_in = world
        .events
        .iter()
        .filter(|(at, e)| *at >= from && matches!(e, SfuEvent::ActiveSpeaker { .. }))
        .count();
    let video_mid = world.clients[alice].own_mids.1;
    let packets = &world.clients[alice].received[&video_mid].packets;
    let switched_to_carol = packets
        .iter()
        .filter(|p| p.1 >= from)
        .any(|p| p.2.get(10) == Some(&(carol as u8)));
    assert_eq!(cut_in, 2, "carol took the floor and gave it back");
    assert!(!switched_to_carol, "the video flapped to carol and back");
    assert!(
        packets
            .iter()
            .filter(|p| p.1 >= from)
            .all(|p| p.2.get(10) != Some(&(alice as u8))),
        "never her own"
    );
}

#[test]
fn garbage_opus_from_a_peer_is_concealed_and_counted() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let alice = world.join("alice");
    let bob = world.join("bob");
    let carol = world.join("carol");
    world.clients[bob].tone = Some((660.0, 0.25));
    world.clients[bob].audio_level = 20;
    world.clients[carol].junk_audio = true;
    world.clients[carol].audio_level = 10;
    world.clients[alice].tone = Some((300.0, 0.0));
    world.clients[alice].audio_level = 127;
    single_stream(&mut world, alice);
    world.run(Duration::from_secs(3));
    let stats = world.sfu.mixer_stats(&world.room).expect("the room mixes");
    assert!(stats.decode_errors > 0 || stats.concealed > 0, "{stats:?}");
    let shard = world.sfu.stats();
    assert_eq!(shard.mixers, 1);
    assert_eq!(
        (shard.mix_decode_errors, shard.mix_concealed),
        (stats.decode_errors, stats.concealed),
        "the shard's counters show it"
    );
    let amplitudes = heard(&world, alice, &[660.0]);
    assert!(amplitudes[0] > 0.1, "bob is still heard: {amplitudes:?}");
}

#[test]
fn a_recording_of_the_room_decodes_to_its_duration_and_content() {
    let mut world = World::new();
    // Any of them may be made single-stream: their own m-lines both ways.
    world.own_lines = OwnLines::BothWays;
    let freqs = [500.0, 800.0];
    for (i, name) in ["alice", "bob"].into_iter().enumerate() {
        let index = world.join(name);
        world.clients[index].tone = Some((freqs[i], 0.25));
        world.clients[index].audio_level = 20;
    }
    world.run(Duration::from_secs(1));
    let room = world.room.clone();
    let now = world.now;
    world.sfu.start_recording(now, &room).expect("the room exists");
    assert!(world.sfu.is_recording(&room));
    world.run(Duration::from_secs(3));
    let now = world.now;
    let duration = world.sfu.stop_recording(now, &room).expect("it was recording");
    world.run(Duration::from_millis(100));
    assert!(!world.sfu.is_recording(&room));
    let shard = world.sfu.stats();
    assert_eq!(shard.mixers, 0, "nothing left to mix: the mixer is gone");
    assert!(shard.mix_ticks >= 150, "its counters stay: {shard:?}");
    let mut file = Vec::new();
    let mut finished = 0;
    for (_, event) in &world.events {
        if let SfuEvent::Recording {
            bytes, finished: last, ..
        } = event
        {
            file.extend_from_slice(bytes);
            finished += usize::from(*last);
        }
    }
    assert_eq!(finished, 1);
    let stream = mixer::ogg::read(&file).expect("a valid Ogg/Opus file");
    let mut decoder = mixer::codec::OpusDecoder::new().expect("decoder");
    let mut pcm = Vec::new();
    let mut out = vec![0f32; mixer::codec::MAX_PACKET_SAMPLES];
    for packet in &stream.packets {
        let n = decoder.decode(packet, &mut out).expect("decodes");
        pcm.extend_from_slice(&out[..n]);
    }
    let decoded = (pcm.len() - usize::from(stream.pre_skip)) as f64 / 48_000.0;
    assert!(
        (decoded - duration.as_secs_f64()).abs() < 0.001,
        "{decoded} vs {duration:?}"
    );
    assert!((decoded - 3.0).abs() <= 0.06, "about 3 s: {decoded}");
    let tail = &pcm[pcm.len() - 48_000..];
    for f in freqs {
        assert!(tone_amplitude(tail, f, 48_000.0) > 0.15, "{f} Hz recorded");
    }
    assert!(tone_amplitude(tail, 1200.0, 48_000.0) < 0.01);
}
