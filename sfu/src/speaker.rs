//! Active-speaker detection from the RFC 6464 audio levels publishers put in
//! their RTP header extension (`-dBov`: 0 is loudest, 127 silence).
//!
//! Each audio track keeps an exponentially smoothed level (time constant of a
//! few hundred milliseconds). At most every [`CHECK_INTERVAL`], a room picks the
//! loudest track above [`SPEECH_DBOV`]; a new speaker must beat the current one
//! by [`SWITCH_MARGIN_DB`] so that the choice does not flap. A track not heard for
//! [`STALE`] counts as silent.

use std::time::{Duration, Instant};

/// Levels quieter than this (in dBov) are not speech.
pub const SPEECH_DBOV: f32 = -55.0;
/// How much louder (dB) a new speaker must be than the current one.
pub const SWITCH_MARGIN_DB: f32 = 6.0;
/// How often a room re-evaluates its speaker.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(300);
/// A track silent for this long no longer counts.
pub const STALE: Duration = Duration::from_millis(1000);
/// Weight of each new 20 ms sample (≈ 200 ms time constant).
const SMOOTHING: f32 = 0.1;
const SILENCE_DBOV: f32 = -127.0;

/// The smoothed level of one audio track.
#[derive(Debug, Clone, Copy)]
pub struct LevelMeter {
    dbov: f32,
    updated: Option<Instant>,
}

impl Default for LevelMeter {
    fn default() -> Self {
        Self {
            dbov: SILENCE_DBOV,
            updated: None,
        }
    }
}

impl LevelMeter {
    /// Adds one packet's level (`-dBov` as in the extension, and its voice-activity flag).
    pub fn add(&mut self, now: Instant, level: i8, voice_activity: Option<bool>) {
        let sample = if voice_activity == Some(false) {
            SILENCE_DBOV
        } else {
            -f32::from(level.unsigned_abs())
        };
        self.dbov += SMOOTHING * (sample - self.dbov);
        self.updated = Some(now);
    }

    /// The smoothed level in dBov at `now` (silence once stale).
    pub fn level(&self, now: Instant) -> f32 {
        match self.updated {
            Some(at) if now.saturating_duration_since(at) < STALE => self.dbov,
            _ => SILENCE_DBOV,
        }
    }
}

/// Picks the room's speaker among `(candidate, level)` pairs, given the current one.
/// Returns the new speaker if it changes.
pub fn choose<T: Copy + PartialEq>(current: Option<T>, levels: impl Iterator<Item = (T, f32)>) -> Option<T> {
    let mut loudest: Option<(T, f32)> = None;
    let mut current_level = SILENCE_DBOV;
    for (candidate, level) in levels {
        if Some(candidate) == current {
            current_level = current_level.max(level);
        }
        if loudest.is_none_or(|(_, l)| level > l) {
            loudest = Some((candidate, level));
        }
    }
    let (candidate, level) = loudest?;
    if Some(candidate) == current || level < SPEECH_DBOV {
        return None;
    }
    let current_speaks = current.is_some() && current_level >= SPEECH_DBOV;
    (!current_speaks || level >= current_level + SWITCH_MARGIN_DB).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(now: Instant, level: i8, packets: usize) -> LevelMeter {
        let mut m = LevelMeter::default();
        for _ in 0..packets {
            m.add(now, level, Some(true));
        }
        m
    }

    #[test]
    fn smoothing_and_staleness() {
        let t = Instant::now();
        let m = meter(t, 30, 50);
        assert!((m.level(t) + 30.0).abs() < 1.0, "{}", m.level(t));
        assert_eq!(m.level(t + STALE), SILENCE_DBOV);
        let mut quiet = m;
        quiet.add(t, 30, Some(false));
        assert!(quiet.level(t) < m.level(t), "voice_activity=false counts as silence");
    }

    #[test]
    fn choice_with_hysteresis() {
        assert_eq!(choose(None, [(1, -30.0), (2, -40.0)].into_iter()), Some(1));
        assert_eq!(
            choose(Some(1), [(1, -30.0), (2, -27.0)].into_iter()),
            None,
            "within the margin: keep"
        );
        assert_eq!(choose(Some(1), [(1, -30.0), (2, -20.0)].into_iter()), Some(2));
        assert_eq!(
            choose(Some(1), [(1, -90.0), (2, -50.0)].into_iter()),
            Some(2),
            "the current one went quiet"
        );
        assert_eq!(
            choose(None, [(1, -80.0), (2, -90.0)].into_iter()),
            None,
            "nobody speaks"
        );
        assert_eq!(choose::<u8>(None, std::iter::empty()), None);
    }
}
