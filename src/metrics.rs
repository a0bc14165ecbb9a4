//! Prometheus text exposition. Metric names live here, in one place; the parts
//! expose their counters as plain values.

use homeserver::Homeserver;
use sfu::{DropReason, ShardStats};
use std::fmt::Write as _;
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

/// Renders every metric of the running parts.
pub fn render(started: Instant, hs: &Homeserver, shards: &[ShardStats]) -> String {
    let mut out = String::new();
    let s = &hs.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    metric(
        &mut out,
        "switchboard_uptime_seconds",
        Kind::Gauge,
        "Seconds since the process started.",
        started.elapsed().as_secs_f64(),
    );
    metric(
        &mut out,
        "switchboard_http_requests_total",
        Kind::Counter,
        "HTTP requests received by the homeserver.",
        get(&s.requests),
    );
    metric(
        &mut out,
        "switchboard_registrations_total",
        Kind::Counter,
        "Users registered.",
        get(&s.registrations),
    );
    metric(
        &mut out,
        "switchboard_logins_total",
        Kind::Counter,
        "Successful password logins.",
        get(&s.logins),
    );
    metric(
        &mut out,
        "switchboard_events_sent_total",
        Kind::Counter,
        "Room events sent by clients.",
        get(&s.events_sent),
    );
    metric(
        &mut out,
        "switchboard_to_device_messages_total",
        Kind::Counter,
        "To-device messages queued.",
        get(&s.to_device_sent),
    );
    metric(
        &mut out,
        "switchboard_sync_requests_total",
        Kind::Counter,
        "/sync requests.",
        get(&s.syncs),
    );
    metric(
        &mut out,
        "switchboard_sync_waiting",
        Kind::Gauge,
        "/sync requests currently long-polling.",
        get(&s.syncs_waiting),
    );
    metric(
        &mut out,
        "switchboard_rate_limited_total",
        Kind::Counter,
        "Requests refused with M_LIMIT_EXCEEDED.",
        get(&s.rate_limited),
    );
    metric(
        &mut out,
        "switchboard_turn_credentials_total",
        Kind::Counter,
        "TURN REST credentials minted.",
        get(&s.turn_credentials),
    );
    render_sfu(&mut out, shards);
    out
}

/// A shard metric: name, kind, help, and how to read it.
type ShardSeries = (&'static str, Kind, &'static str, fn(&ShardStats) -> u64);

/// One series per shard for the SFU, labelled `shard="i"`.
fn render_sfu(out: &mut String, shards: &[ShardStats]) {
    if shards.is_empty() {
        return;
    }
    let series: [ShardSeries; 8] = [
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
            "switchboard_sfu_keyframe_requests_total",
            Kind::Counter,
            "Keyframe requests sent to publishers.",
            |s| s.keyframe_requests,
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
