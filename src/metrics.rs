//! Prometheus text exposition. Metric names live here, in one place; the parts
//! expose their counters as plain values.

use homeserver::Homeserver;
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
pub fn render(started: Instant, hs: &Homeserver) -> String {
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
    out
}
