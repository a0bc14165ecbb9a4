//! Prometheus text exposition. Metric names live here, in one place; the parts
//! expose their counters as plain values.

use crate::drivers::turn::TurnStats;
use homeserver::{Homeserver, Stats};
use sfu::{DropReason, ShardStats};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Instant;

enum Kind {
    Counter,
    Gauge,
}

fn metric(out: &mut String, name: &str, kind: Kind, help: &str, value: f64) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// A homeserver counter: name, kind, help, and which counter.
type HomeserverSeries = (&'static str, Kind, &'static str, fn(&Stats) -> &AtomicU64);

/// Renders every metric of the running parts.
pub fn render(started: Instant, hs: Option<&Homeserver>, shards: &[ShardStats], turn: Option<&TurnStats>) -> String {
    let mut out = String::new();
    let uptime = started.elapsed().as_secs_f64();
    metric(
        &mut out,
        "switchboard_uptime_seconds",
        Kind::Gauge,
        "Seconds since the process started.",
        uptime,
    );
    if let Some(hs) = hs {
        let series: [HomeserverSeries; 9] = [
            (
                "switchboard_http_requests_total",
                Kind::Counter,
                "HTTP requests received by the homeserver.",
                |s| &s.requests,
            ),
            (
                "switchboard_registrations_total",
                Kind::Counter,
                "Users registered.",
                |s| &s.registrations,
            ),
            (
                "switchboard_logins_total",
                Kind::Counter,
                "Successful password logins.",
                |s| &s.logins,
            ),
            (
                "switchboard_events_sent_total",
                Kind::Counter,
                "Room events sent by clients.",
                |s| &s.events_sent,
            ),
            (
                "switchboard_to_device_messages_total",
                Kind::Counter,
                "To-device messages queued.",
                |s| &s.to_device_sent,
            ),
            (
                "switchboard_sync_requests_total",
                Kind::Counter,
                "/sync requests.",
                |s| &s.syncs,
            ),
            (
                "switchboard_sync_waiting",
                Kind::Gauge,
                "/sync requests currently long-polling.",
                |s| &s.syncs_waiting,
            ),
            (
                "switchboard_rate_limited_total",
                Kind::Counter,
                "Requests refused with M_LIMIT_EXCEEDED.",
                |s| &s.rate_limited,
            ),
            (
                "switchboard_turn_credentials_total",
                Kind::Counter,
                "TURN REST credentials minted.",
                |s| &s.turn_credentials,
            ),
        ];
        for (name, kind, help, counter) in series {
            metric(
                &mut out,
                name,
                kind,
                help,
                counter(&hs.stats).load(Ordering::Relaxed) as f64,
            );
        }
    }
    render_sfu(&mut out, shards);
    if let Some(turn) = turn {
        render_turn(&mut out, turn);
    }
    out
}

/// A TURN metric: name, kind, help, and how to read it.
type TurnSeries = (&'static str, Kind, &'static str, fn(&TurnStats) -> u64);

fn render_turn(out: &mut String, turn: &TurnStats) {
    let series: [TurnSeries; 13] = [
        ("switchboard_turn_allocations", Kind::Gauge, "TURN allocations.", |s| {
            s.relay.allocations
        }),
        (
            "switchboard_turn_allocations_total",
            Kind::Counter,
            "TURN allocations created.",
            |s| s.relay.allocations_total,
        ),
        ("switchboard_turn_channels", Kind::Gauge, "TURN channels bound.", |s| {
            s.relay.channels
        }),
        (
            "switchboard_turn_packets_to_peers_total",
            Kind::Counter,
            "Packets relayed from clients to peers.",
            |s| s.relay.packets_to_peers,
        ),
        (
            "switchboard_turn_bytes_to_peers_total",
            Kind::Counter,
            "Payload bytes relayed from clients to peers.",
            |s| s.relay.bytes_to_peers,
        ),
        (
            "switchboard_turn_packets_to_clients_total",
            Kind::Counter,
            "Packets relayed from peers to clients.",
            |s| s.relay.packets_to_clients,
        ),
        (
            "switchboard_turn_bytes_to_clients_total",
            Kind::Counter,
            "Payload bytes relayed from peers to clients.",
            |s| s.relay.bytes_to_clients,
        ),
        (
            "switchboard_turn_binding_requests_total",
            Kind::Counter,
            "STUN Binding requests answered.",
            |s| s.relay.binding_requests,
        ),
        (
            "switchboard_turn_send_failures_total",
            Kind::Counter,
            "Datagrams the kernel did not take.",
            |s| s.send_failures,
        ),
        (
            "switchboard_turn_tcp_queue_drops_total",
            Kind::Counter,
            "Frames dropped for TCP clients too slow to take them.",
            |s| s.tcp_queue_drops,
        ),
        (
            "switchboard_turn_local_relays_total",
            Kind::Counter,
            "Packets between two of our allocations, handed over without the kernel.",
            |s| s.local_relays,
        ),
        (
            "switchboard_turn_panics_total",
            Kind::Counter,
            "Datagrams dropped because the relay core panicked on them (a bug: please report it).",
            |s| s.panics,
        ),
        (
            "switchboard_turn_connections",
            Kind::Gauge,
            "Open TURN TCP/TLS connections.",
            |s| s.connections,
        ),
    ];
    for (name, kind, help, value) in series {
        metric(out, name, kind, help, value(turn) as f64);
    }
    let name = "switchboard_turn_refusals_total";
    let _ = writeln!(
        out,
        "# HELP {name} TURN requests refused with a STUN error, by reason.\n# TYPE {name} counter"
    );
    for refusal in turn_config::relay::Refusal::ALL {
        let _ = writeln!(
            out,
            "{name}{{code=\"{}\",reason=\"{}\"}} {}",
            refusal.code(),
            refusal.as_str(),
            turn.relay.refusals(refusal)
        );
    }
    let name = "switchboard_turn_drops_total";
    let _ = writeln!(
        out,
        "# HELP {name} TURN packets dropped without an answer, by reason.\n# TYPE {name} counter"
    );
    for reason in turn_config::relay::DropReason::ALL {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{}\"}} {}",
            reason.as_str(),
            turn.relay.drops(reason)
        );
    }
}

/// A shard metric: name, kind, help, and how to read it.
type ShardSeries = (&'static str, Kind, &'static str, fn(&ShardStats) -> u64);

/// One series per shard for the SFU, labelled `shard="i"`.
fn render_sfu(out: &mut String, shards: &[ShardStats]) {
    if shards.is_empty() {
        return;
    }
    let series: [ShardSeries; 16] = [
        ("switchboard_sfu_sessions", Kind::Gauge, "WebRTC sessions.", |s| {
            s.sessions
        }),
        (
            "switchboard_sfu_rooms",
            Kind::Gauge,
            "Rooms with at least one session.",
            |s| s.rooms,
        ),
        ("switchboard_sfu_tracks", Kind::Gauge, "Published tracks.", |s| s.tracks),
        (
            "switchboard_sfu_subscriptions",
            Kind::Gauge,
            "Subscribed tracks.",
            |s| s.subscriptions,
        ),
        (
            "switchboard_sfu_datagrams_in_total",
            Kind::Counter,
            "UDP datagrams received.",
            |s| s.datagrams_in,
        ),
        (
            "switchboard_sfu_datagrams_out_total",
            Kind::Counter,
            "UDP datagrams sent.",
            |s| s.datagrams_out,
        ),
        (
            "switchboard_sfu_packets_forwarded_total",
            Kind::Counter,
            "RTP packets forwarded.",
            |s| s.packets_forwarded,
        ),
        (
            "switchboard_sfu_packets_sealed_total",
            Kind::Counter,
            "Forwarded packets the SFU encrypted itself (the rest go through str0m).",
            |s| s.packets_sealed,
        ),
        (
            "switchboard_sfu_packets_opened_total",
            Kind::Counter,
            "Publishers' RTP packets the SFU decrypted itself (audio; the rest go through str0m).",
            |s| s.packets_opened,
        ),
        (
            "switchboard_sfu_packets_resent_total",
            Kind::Counter,
            "Video packets the SFU encrypted again for a subscriber's NACK.",
            |s| s.packets_resent,
        ),
        (
            "switchboard_sfu_keyframe_requests_total",
            Kind::Counter,
            "Keyframe requests sent to publishers.",
            |s| s.keyframe_requests,
        ),
        (
            "switchboard_sfu_mixers",
            Kind::Gauge,
            "Rooms mixing audio (single-stream sessions or a recording).",
            |s| s.mixers,
        ),
        (
            "switchboard_sfu_mix_ticks_total",
            Kind::Counter,
            "Mixer ticks (20 ms) run.",
            |s| s.mix_ticks,
        ),
        (
            "switchboard_sfu_mix_frames_out_total",
            Kind::Counter,
            "Mixed frames sent to single-stream sessions.",
            |s| s.mix_frames_out,
        ),
        (
            "switchboard_sfu_mix_decode_errors_total",
            Kind::Counter,
            "Opus packets from publishers the mixer could not decode.",
            |s| s.mix_decode_errors,
        ),
        (
            "switchboard_sfu_mix_concealed_total",
            Kind::Counter,
            "Frames the mixer concealed (lost, late or undecodable input).",
            |s| s.mix_concealed,
        ),
    ];
    for (name, kind, help, value) in series {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, shard) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", value(shard));
        }
    }
    let name = "switchboard_sfu_forwarding_delay_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} From a datagram's arrival in the kernel to the end of the shard turn that handled it (its forwarded packets sent).\n# TYPE {name} summary"
    );
    for (i, shard) in shards.iter().enumerate() {
        let delay = &shard.forwarding_delay;
        for q in [0.5, 0.9, 0.99] {
            if let Some(at) = delay.quantile(q) {
                let _ = writeln!(out, "{name}{{shard=\"{i}\",quantile=\"{q}\"}} {}", at.as_secs_f64());
            }
        }
        let _ = writeln!(out, "{name}_sum{{shard=\"{i}\"}} {}", delay.sum().as_secs_f64());
        let _ = writeln!(out, "{name}_count{{shard=\"{i}\"}} {}", delay.count());
    }
    let name = "switchboard_sfu_drops_total";
    let _ = writeln!(
        out,
        "# HELP {name} Datagrams or packets dropped, by reason.\n# TYPE {name} counter"
    );
    for (i, shard) in shards.iter().enumerate() {
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\"}} {}",
                reason.as_str(),
                shard.drops(reason)
            );
        }
    }
}
