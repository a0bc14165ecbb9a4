//! Simulcast: a publisher sends one video in several layers (RTP streams with
//! their own `rid` and SSRC); each subscriber gets one of them.
//!
//! Layers are ranked by their measured bitrate, not by their names (clients
//! name them "q/h/f", "l/m/h" or "0/1/2", in either order). A subscriber's
//! target is the best-ranked layer that fits its share of the bandwidth
//! estimate towards it and does not exceed the quality it asked for; the switch
//! itself happens on the target layer's next keyframe (see `Forwarder`).

use std::time::{Duration, Instant};
use str0m::media::Rid;

/// How long one bitrate measurement window lasts.
const WINDOW: Duration = Duration::from_millis(500);
/// A layer silent for this long is paused (the publisher stopped sending it).
const PAUSED_AFTER: Duration = Duration::from_millis(1500);

/// The highest quality a subscriber wants (a requested size, in coarse steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Quality {
    Low,
    Medium,
    High,
}

/// One layer of a track and its measured bitrate.
#[derive(Debug, Clone)]
pub struct Layer {
    pub rid: Option<Rid>,
    window_start: Option<Instant>,
    window_bytes: u64,
    bitrate_bps: u64,
    last_packet: Option<Instant>,
}

impl Layer {
    pub fn new(rid: Option<Rid>) -> Self {
        Self {
            rid,
            window_start: None,
            window_bytes: 0,
            bitrate_bps: 0,
            last_packet: None,
        }
    }

    /// Counts a packet of `bytes` arriving at `now`.
    pub fn add(&mut self, now: Instant, bytes: usize) {
        self.last_packet = Some(now);
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= WINDOW {
            self.bitrate_bps = (self.window_bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }

    pub fn bitrate_bps(&self) -> u64 {
        self.bitrate_bps
    }

    pub fn is_active(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|at| now.saturating_duration_since(at) < PAUSED_AFTER)
    }
}

/// The layer to target: the best one that is active, fits `budget_bps` (if
/// known) and is not above `max` in rank. Falls back to the lowest active layer.
pub fn select(layers: &[Layer], now: Instant, budget_bps: Option<u64>, max: Quality) -> usize {
    let mut active: Vec<usize> = (0..layers.len()).filter(|&i| layers[i].is_active(now)).collect();
    if active.is_empty() {
        return 0;
    }
    active.sort_by_key(|&i| (layers[i].bitrate_bps(), i));
    let highest_rank = active.len() - 1;
    let cap = match max {
        Quality::Low => 0,
        Quality::Medium => highest_rank.min(1),
        Quality::High => highest_rank,
    };
    let mut chosen = active[0];
    for &index in active.iter().take(cap + 1) {
        if budget_bps.is_none_or(|budget| layers[index].bitrate_bps() <= budget) {
            chosen = index;
        } else {
            break;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(now: Instant, rid: &str, bytes_per_10ms: usize) -> Layer {
        let mut layer = Layer::new(Some(rid.into()));
        for i in 0..=60 {
            layer.add(now + Duration::from_millis(10 * i), bytes_per_10ms);
        }
        layer
    }

    #[test]
    fn selection_by_budget_and_quality() {
        let t = Instant::now();
        // Named high-first, as some clients do: ranking is by bitrate anyway.
        let layers = vec![layer(t, "f", 1250), layer(t, "q", 125), layer(t, "h", 500)];
        let now = t + Duration::from_millis(600);
        assert!(
            (950_000..=1_050_000).contains(&layers[0].bitrate_bps()),
            "{}",
            layers[0].bitrate_bps()
        );
        assert_eq!(select(&layers, now, None, Quality::High), 0);
        assert_eq!(select(&layers, now, Some(600_000), Quality::High), 2);
        assert_eq!(
            select(&layers, now, Some(50_000), Quality::High),
            1,
            "the lowest even if it does not fit"
        );
        assert_eq!(select(&layers, now, None, Quality::Medium), 2);
        assert_eq!(select(&layers, now, None, Quality::Low), 1);
        // A paused layer is skipped.
        assert_eq!(select(&layers, now + Duration::from_secs(3), None, Quality::High), 0);
        let mut paused = layers.clone();
        paused[0].last_packet = Some(t - Duration::from_secs(5));
        assert_eq!(select(&paused, now, None, Quality::High), 2);
    }
}
