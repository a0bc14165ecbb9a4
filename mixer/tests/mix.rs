//! The mixer in virtual time with real opus: participants send tones of their
//! own frequency; what each listener hears is decoded and analysed by frequency.

use std::time::{Duration, Instant};
use switchboard_mixer::analysis::{sine, tone_amplitude};
use switchboard_mixer::codec::{MAX_PACKET_BYTES, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use switchboard_mixer::{FRAME, FRAME_SAMPLES, InputId, ListenerId, Mixer, MixerConfig, ogg};

struct Talker {
    input: InputId,
    freq: f32,
    amplitude: f32,
    /// RFC 6464 level it declares (−dBov).
    level: i8,
    encoder: OpusEncoder,
    seq: u64,
}

impl Talker {
    fn new(id: u64, freq: f32, amplitude: f32, level: i8) -> Self {
        Self {
            input: InputId(id),
            freq,
            amplitude,
            level,
            encoder: OpusEncoder::new(48_000, 5).expect("encoder"),
            seq: 0,
        }
    }

    fn packet(&mut self) -> Vec<u8> {
        let mut pcm = vec![0f32; FRAME_SAMPLES];
        sine(self.freq, self.amplitude, self.seq * FRAME_SAMPLES as u64, &mut pcm);
        let mut out = vec![0u8; MAX_PACKET_BYTES];
        let len = self.encoder.encode(&pcm, &mut out).expect("encode");
        out.truncate(len);
        out
    }
}

/// Per listener: its decoded audio.
struct Ears {
    decoder: OpusDecoder,
    pcm: Vec<f32>,
}

/// Runs `ticks` ticks: every talker's packet arrives 5 ms after each tick.
fn run(mixer: &mut Mixer, talkers: &mut [Talker], start: Instant, ticks: u64, ears: &mut [(ListenerId, Ears)]) {
    for k in 0..ticks {
        let at = start + FRAME * k as u32 + Duration::from_millis(5);
        for talker in talkers.iter_mut() {
            let packet = talker.packet();
            mixer.handle_packet(at, talker.input, talker.seq, Some(-talker.level), Some(true), &packet);
            talker.seq += 1;
        }
        mixer.handle_timeout(start + FRAME * (k as u32 + 1));
        while let Some(frame) = mixer.poll_frame() {
            let Some((_, ears)) = ears.iter_mut().find(|(id, _)| *id == frame.listener) else {
                continue;
            };
            let mut out = vec![0f32; MAX_PACKET_SAMPLES];
            let n = ears.decoder.decode(&frame.payload, &mut out).expect("the mix decodes");
            ears.pcm.extend_from_slice(&out[..n]);
        }
    }
}

fn ears(ids: &[u64]) -> Vec<(ListenerId, Ears)> {
    ids.iter()
        .map(|id| {
            (
                ListenerId(*id),
                Ears {
                    decoder: OpusDecoder::new().expect("decoder"),
                    pcm: Vec::new(),
                },
            )
        })
        .collect()
}

/// The amplitude of each frequency in the last second a listener heard.
fn heard(pcm: &[f32], freqs: &[f32]) -> Vec<f32> {
    let tail = &pcm[pcm.len().saturating_sub(48_000)..];
    freqs.iter().map(|f| tone_amplitude(tail, *f, 48_000.0)).collect()
}

#[test]
fn each_listener_hears_the_others_and_not_itself() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig::default());
    let freqs = [440.0, 660.0, 1000.0];
    let mut talkers: Vec<Talker> = freqs
        .iter()
        .enumerate()
        .map(|(i, f)| Talker::new(i as u64 + 1, *f, 0.25, 25))
        .collect();
    // Listeners 1–3 are the talkers; listener 9 only listens.
    for id in 1..=3 {
        mixer.add_listener(start, ListenerId(id), Some(InputId(id)));
    }
    mixer.add_listener(start, ListenerId(9), None);
    let mut ears = ears(&[1, 2, 3, 9]);
    run(&mut mixer, &mut talkers, start, 150, &mut ears);
    for (id, ear) in &ears {
        assert!(
            ear.pcm.len() >= 149 * FRAME_SAMPLES,
            "listener {id:?} got {} samples",
            ear.pcm.len()
        );
        let amplitudes = heard(&ear.pcm, &freqs);
        for (i, amplitude) in amplitudes.iter().enumerate() {
            let own = id.0 == i as u64 + 1;
            if own {
                assert!(*amplitude < 0.01, "listener {id:?} hears itself: {amplitudes:?}");
            } else {
                assert!(
                    *amplitude > 0.15,
                    "listener {id:?} misses {} Hz: {amplitudes:?}",
                    freqs[i]
                );
            }
        }
    }
    let stats = mixer.stats();
    // 4 distinct mixes a tick (all, and one without each talker), not one per listener.
    assert_eq!(stats.encoded, 4 * stats.ticks, "{stats:?}");
    assert_eq!(stats.decode_errors, 0);
}

#[test]
fn with_five_talkers_only_the_loudest_three_are_heard() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig::default());
    let freqs = [400.0, 550.0, 700.0, 850.0, 1000.0];
    // Declared levels: talkers 1–3 at −20/−25/−30 dBov, 4–5 at −45/−50.
    let levels = [20, 25, 30, 45, 50];
    let mut talkers: Vec<Talker> = (0..5)
        .map(|i| Talker::new(i as u64 + 1, freqs[i], 0.2, levels[i]))
        .collect();
    mixer.add_listener(start, ListenerId(9), None);
    let mut ears = ears(&[9]);
    run(&mut mixer, &mut talkers, start, 150, &mut ears);
    let amplitudes = heard(&ears[0].1.pcm, &freqs);
    for (i, amplitude) in amplitudes.iter().enumerate() {
        if i < 3 {
            assert!(*amplitude > 0.1, "{} Hz should be heard: {amplitudes:?}", freqs[i]);
        } else {
            assert!(*amplitude < 0.01, "{} Hz should not be heard: {amplitudes:?}", freqs[i]);
        }
    }
    assert_eq!(mixer.speakers(), vec![InputId(1), InputId(2), InputId(3)]);
    // Only the three speakers were decoded.
    assert!(mixer.stats().decoded <= 3 * mixer.stats().ticks, "{:?}", mixer.stats());

    // A quiet talker gets loud: it replaces the quietest speaker.
    talkers[4].level = 10;
    run(&mut mixer, &mut talkers, start + FRAME * 150, 100, &mut ears);
    let amplitudes = heard(&ears[0].1.pcm, &freqs);
    assert!(amplitudes[4] > 0.1, "now 1000 Hz is heard: {amplitudes:?}");
    assert!(amplitudes[2] < 0.01, "and 700 Hz no longer: {amplitudes:?}");
}

#[test]
fn garbage_payloads_are_counted_and_concealed_never_a_panic() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig::default());
    mixer.add_listener(start, ListenerId(9), None);
    let mut talker = Talker::new(1, 500.0, 0.3, 20);
    let mut frames = 0;
    let mut seed = 0x1234_5678u32;
    for k in 0..200u32 {
        let at = start + FRAME * k + Duration::from_millis(5);
        let packet = talker.packet();
        mixer.handle_packet(at, talker.input, talker.seq, Some(-20), None, &packet);
        talker.seq += 1;
        // A second input sends nothing but noise of every length, with odd sequence numbers.
        let len = (seed % 1600) as usize;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        mixer.handle_packet(
            at,
            InputId(2),
            u64::from(seed % 7) + u64::from(k),
            Some(-10),
            None,
            &junk,
        );
        mixer.handle_packet(at, InputId(3), u64::MAX - 1, None, None, &junk);
        mixer.handle_timeout(start + FRAME * (k + 1));
        while mixer.poll_frame().is_some() {
            frames += 1;
        }
    }
    let stats = mixer.stats();
    assert!(frames >= 195, "the listener kept getting frames: {frames}");
    assert!(stats.decode_errors > 0, "garbage was counted: {stats:?}");
    assert!(stats.packets_dropped > 0, "{stats:?}");
}

#[test]
fn a_recording_decodes_to_the_expected_duration_and_content() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig::default());
    let mut talkers = vec![Talker::new(1, 500.0, 0.25, 20), Talker::new(2, 800.0, 0.25, 22)];
    mixer.start_recording(start, 42);
    let mut file = Vec::new();
    // 3 seconds.
    let mut nobody: Vec<(ListenerId, Ears)> = Vec::new();
    run(&mut mixer, &mut talkers, start, 150, &mut nobody);
    let recorded = mixer.stop_recording().expect("it was recording");
    while let Some(bytes) = mixer.poll_recording() {
        file.extend(bytes);
    }
    assert!(mixer.is_idle());

    let stream = ogg::read(&file).expect("a valid Ogg/Opus file");
    assert!(stream.ended && stream.channels == 1);
    let mut decoder = OpusDecoder::new().expect("decoder");
    let mut pcm = Vec::new();
    let mut out = vec![0f32; MAX_PACKET_SAMPLES];
    for packet in &stream.packets {
        let n = decoder.decode(packet, &mut out).expect("decodes");
        pcm.extend_from_slice(&out[..n]);
    }
    let pcm = &pcm[usize::from(stream.pre_skip)..];
    let duration = pcm.len() as f64 / 48_000.0;
    assert!((duration - 3.0).abs() < 0.01, "duration {duration}");
    assert!(
        (duration - recorded.as_secs_f64()).abs() < 0.001,
        "{duration} vs {recorded:?}"
    );
    assert_eq!(stream.final_granule, 150 * 960, "three seconds of packets");
    let amplitudes = heard(pcm, &[500.0, 800.0, 1200.0]);
    assert!(amplitudes[0] > 0.15 && amplitudes[1] > 0.15, "{amplitudes:?}");
    assert!(amplitudes[2] < 0.01, "{amplitudes:?}");
}

#[test]
fn a_speaker_who_leaves_is_replaced_by_the_next_loudest() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig {
        max_speakers: 2,
        ..MixerConfig::default()
    });
    let freqs = [450.0, 750.0, 1050.0];
    let mut talkers: Vec<Talker> = (0..3)
        .map(|i| Talker::new(i as u64 + 1, freqs[i], 0.25, [20, 22, 40][i]))
        .collect();
    mixer.add_listener(start, ListenerId(9), None);
    let mut ears = ears(&[9]);
    run(&mut mixer, &mut talkers, start, 100, &mut ears);
    let before = heard(&ears[0].1.pcm, &freqs);
    assert!(before[0] > 0.15 && before[1] > 0.15 && before[2] < 0.01, "{before:?}");
    // Talker 1 hangs up: its track is gone, the quiet third one is mixed instead.
    mixer.remove_input(InputId(1));
    talkers.remove(0);
    run(&mut mixer, &mut talkers, start + FRAME * 100, 100, &mut ears);
    let after = heard(&ears[0].1.pcm, &freqs);
    assert!(after[0] < 0.01 && after[1] > 0.15 && after[2] > 0.15, "{after:?}");
    assert_eq!(mixer.speakers(), vec![InputId(2), InputId(3)]);
}

#[test]
fn a_stalled_clock_skips_ahead_instead_of_bursting() {
    let start = Instant::now();
    let mut mixer = Mixer::new(MixerConfig::default());
    mixer.add_listener(start, ListenerId(9), None);
    mixer.handle_timeout(start + FRAME);
    // The thread was stalled for 10 s: a few ticks run, the rest are skipped.
    let late = start + Duration::from_secs(10);
    mixer.handle_timeout(late);
    let stats = mixer.stats();
    assert!(stats.ticks <= 7, "{stats:?}");
    assert!(stats.skipped_ticks >= 490, "{stats:?}");
    assert!(mixer.poll_timeout().is_some_and(|at| at > late && at <= late + FRAME));
    // Sequence numbers at the very end of the range do not overflow anything.
    mixer.handle_packet(late, InputId(1), u64::MAX, Some(-20), None, &[0xfc, 0xff, 0xfe]);
    mixer.handle_packet(late, InputId(1), u64::MAX - 1, Some(-20), None, &[0xfc, 0xff, 0xfe]);
    mixer.handle_timeout(late + FRAME * 3);
}
