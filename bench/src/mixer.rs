//! `mixer`: what single-stream listeners cost the SFU core, and the delay the
//! mix path adds.
//!
//! One conference: three speakers sending real opus tones (with RFC 6464
//! levels) and `--listeners` single-stream listeners, all real str0m peers
//! (ICE, DTLS-SRTP) on the SFU core's simulated network in virtual time (the
//! harness of `sfu/tests/`). What is measured is the wall-clock time spent
//! inside the `Sfu` calls — the core's CPU — per simulated second: listeners
//! per core = listeners × simulated seconds / core seconds. Baseline, in the
//! same run: the same speakers and as many receive-only multi-stream listeners,
//! each forwarded the three speakers' audio (what the SFU does without mixing).
//!
//! The added mouth-to-ear delay: in a conference of the three speakers, one
//! single-stream listener (through the mixer) and one receive-only
//! multi-stream listener (the forwarded streams), every speaker in turn starts
//! a tone out of silence; both listeners decode what they get, and the
//! difference between the two onsets is the mix path's addition (the network
//! hops are the same in both). Virtual time makes processing instantaneous, so
//! the core's time per mixer tick at the measured load is printed beside it.

#[path = "../../sfu/tests/common/mod.rs"]
mod sim;

use anyhow::Result;
use sim::World;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Single-stream listeners in the conference (at most 1,000).
    #[arg(long, default_value_t = 200)]
    listeners: usize,
    /// Simulated seconds measured per scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Single-stream listeners also send audio (silence at −127 dBov, 50
    /// packets a second, as an open but quiet microphone does): every one is a
    /// mixer input, buffered and skipped undecoded.
    #[arg(long)]
    listeners_send: bool,
}

const FREQS: [f32; 3] = [440.0, 660.0, 1000.0];
const WARM_UP: Duration = Duration::from_secs(3);

/// User + system CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// Three speakers, a few milliseconds apart (so their packets meet the mixer
/// at different phases of its tick).
fn speakers(world: &mut World, single_stream: bool) -> Vec<usize> {
    (0..3)
        .map(|i| {
            let c = world.join(&format!("speaker{i}"));
            world.clients[c].tone = Some((FREQS[i], 0.25));
            world.clients[c].audio_level = 20;
            world.clients[c].send_video = false;
            if single_stream {
                let (now, session) = (world.now, world.clients[c].session.expect("session"));
                world.sfu.set_single_stream(now, session);
            }
            world.run(Duration::from_millis(7));
            c
        })
        .collect()
}

struct Measured {
    core: Duration,
    simulated: Duration,
    wall: Duration,
    thread: Duration,
    packets_out: u64,
}

fn measure(world: &mut World, seconds: u64) -> Measured {
    world.run(WARM_UP);
    let (busy, forwarded, wall, thread) = (
        world.sfu_busy,
        world.sfu.stats().packets_forwarded,
        Instant::now(),
        thread_cpu(),
    );
    let simulated = Duration::from_secs(seconds);
    world.run(simulated);
    Measured {
        core: world.sfu_busy - busy,
        simulated,
        wall: wall.elapsed(),
        thread: thread_cpu().saturating_sub(thread),
        packets_out: world.sfu.stats().packets_forwarded - forwarded,
    }
}

fn per_core(listeners: usize, m: &Measured) -> f64 {
    listeners as f64 * m.simulated.as_secs_f64() / m.core.as_secs_f64().max(1e-9)
}

fn report(name: &str, listeners: usize, m: &Measured) {
    println!(
        "  {name}: SFU core {:.3} s for {:.0} s of audio ({:.2} % of a core), {} packets out, \
         {:.1} µs per packet -> {:.0} listeners per core  [simulation: {:.1} s wall, {:.1} s thread CPU]",
        m.core.as_secs_f64(),
        m.simulated.as_secs_f64(),
        100.0 * m.core.as_secs_f64() / m.simulated.as_secs_f64(),
        m.packets_out,
        m.core.as_secs_f64() * 1e6 / m.packets_out.max(1) as f64,
        per_core(listeners, m),
        m.wall.as_secs_f64(),
        m.thread.as_secs_f64(),
    );
}

/// Each speaker in turn starts its tone out of silence: (mix path onset − forwarded path onset).
fn added_delays(world: &mut World, speakers: &[usize], single: usize, forward: usize) -> Vec<Duration> {
    let mut delays = Vec::new();
    for &s in speakers {
        for &c in speakers {
            world.clients[c].tone = Some((FREQS[c % 3], 0.0));
        }
        world.run(Duration::from_secs(1));
        for c in [single, forward] {
            for ear in world.clients[c].ears.values_mut() {
                ear.pcm.clear();
                ear.frames.clear();
            }
        }
        world.clients[s].tone = Some((FREQS[s % 3], 0.25));
        world.run(Duration::from_millis(500));
        let onset = |c: usize| world.clients[c].ears.values().filter_map(|ear| ear.onset(0.05)).min();
        if let (Some(mixed), Some(forwarded)) = (onset(single), onset(forward)) {
            delays.push(mixed.saturating_duration_since(forwarded));
        }
    }
    delays
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!((1..=1000).contains(&args.listeners), "--listeners: between 1 and 1000");
    let listeners = args.listeners;
    println!(
        "mixer: one conference, 3 speakers (real opus), {listeners} listeners{}, {} s simulated per scenario",
        if args.listeners_send {
            " (sending silent audio)"
        } else {
            ""
        },
        args.seconds
    );

    // Single-stream: everyone hears a mix (the speakers a mix-minus).
    let mut world = World::new();
    world.own_lines = switchboard_sfu::OwnLines::BothWays;
    speakers(&mut world, true);
    for i in 0..listeners {
        let c = world.join(&format!("listener{i}"));
        if args.listeners_send {
            world.clients[c].tone = Some((300.0, 0.0));
            world.clients[c].audio_level = 127;
            world.clients[c].send_video = false;
        } else {
            world.clients[c].sending = false;
        }
        let (now, session) = (world.now, world.clients[c].session.expect("session"));
        world.sfu.set_single_stream(now, session);
    }
    let mix = measure(&mut world, args.seconds);
    let stats = world.sfu.mixer_stats(&world.room).unwrap_or_default();
    let receivers = world.clients.iter().filter(|c| c.rtc.is_connected()).count();

    // Baseline: receive-only multi-stream listeners, forwarded the 3 speakers.
    let mut baseline_world = World::new();
    baseline_world.own_lines = switchboard_sfu::OwnLines::BothWays;
    speakers(&mut baseline_world, false);
    for i in 0..listeners {
        let c = baseline_world.join_receive_only(&format!("listener{i}"));
        baseline_world.clients[c].sending = false;
    }
    let baseline = measure(&mut baseline_world, args.seconds);

    report("mix (single-stream listeners)", listeners, &mix);
    println!(
        "    mixer per tick: {:.2} decodes, {:.2} encodes, {:.1} frames out ({receivers} connected peers)",
        stats.decoded as f64 / stats.ticks.max(1) as f64,
        stats.encoded as f64 / stats.ticks.max(1) as f64,
        stats.frames_out as f64 / stats.ticks.max(1) as f64,
    );
    report(
        "baseline (multi-stream, 3 forwarded streams each)",
        listeners,
        &baseline,
    );
    let ratio = per_core(listeners, &mix) / per_core(listeners, &baseline);
    println!(
        "  listeners per core, mix / baseline: {ratio:.2}  (goal: >= 200 single-stream listeners per core: {})",
        if per_core(listeners, &mix) >= 200.0 {
            "met"
        } else {
            "NOT met"
        }
    );

    let tick = mix.core.as_secs_f64() * 1000.0 / stats.ticks.max(1) as f64;
    // The delay: the speakers, one single-stream and one forwarded listener.
    let mut probes = World::new();
    probes.own_lines = switchboard_sfu::OwnLines::BothWays;
    let speakers = speakers(&mut probes, true);
    let forwarded = probes.join_receive_only("probe-forwarded");
    probes.clients[forwarded].listen_all = true;
    let single = probes.join("probe-single");
    probes.clients[single].sending = false;
    probes.clients[single].listen_all = true;
    let (now, session) = (probes.now, probes.clients[single].session.expect("session"));
    probes.sfu.set_single_stream(now, session);
    probes.run(WARM_UP);
    let delays = added_delays(&mut probes, &speakers, single, forwarded);
    if delays.is_empty() {
        println!("  added mouth-to-ear delay: not measured (no onset detected)");
    } else {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mean = delays.iter().map(|d| ms(*d)).sum::<f64>() / delays.len() as f64;
        let max = delays.iter().map(|d| ms(*d)).fold(0.0, f64::max);
        println!(
            "  added mouth-to-ear delay of the mix path (vs the forwarded stream, same run): \
             mean {mean:.1} ms, max {max:.1} ms over {} speakers at different tick phases, \
             plus the core's time per tick at {listeners} listeners: {tick:.2} ms (goal < 40 ms: {})",
            delays.len(),
            if max + tick < 40.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
