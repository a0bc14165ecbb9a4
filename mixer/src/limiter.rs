//! A peak limiter that never lets a sample past its ceiling: the envelope
//! rises with the signal at once (no attack time, so nothing slips through)
//! and falls back slowly (release), and the gain is `ceiling / envelope` when
//! the envelope is above the ceiling. Since the envelope is never below the
//! current sample's magnitude, `|out| <= ceiling` for every sample.

/// −1 dBFS.
pub const CEILING: f32 = 0.891;
/// Per-sample release factor at 48 kHz (≈ 100 ms time constant).
const RELEASE: f32 = 0.999_79;

#[derive(Debug, Clone)]
pub struct Limiter {
    envelope: f32,
}

impl Default for Limiter {
    fn default() -> Self {
        Self { envelope: CEILING }
    }
}

impl Limiter {
    /// Limits `pcm` in place.
    pub fn process(&mut self, pcm: &mut [f32]) {
        let mut envelope = self.envelope;
        for sample in pcm.iter_mut() {
            let magnitude = if sample.is_finite() { sample.abs() } else { 0.0 };
            envelope = (envelope * RELEASE).max(magnitude).max(CEILING);
            let value = if sample.is_finite() { *sample } else { 0.0 };
            *sample = (value * (CEILING / envelope)).clamp(-CEILING, CEILING);
        }
        self.envelope = envelope;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loud_sums_are_limited_without_clipping_and_quiet_ones_pass() {
        let mut limiter = Limiter::default();
        let tone = |i: usize, f: f32| (i as f32 * f * std::f32::consts::TAU / 48_000.0).sin();
        // Three full-scale tones summed: peaks near 3.0.
        let mut loud: Vec<f32> = (0..48_000)
            .map(|i| tone(i, 300.0) + tone(i, 500.0) + tone(i, 700.0))
            .collect();
        limiter.process(&mut loud);
        let peak = loud.iter().fold(0f32, |m, s| m.max(s.abs()));
        assert!(peak <= CEILING, "peak {peak}");
        assert!(peak > 0.8, "still loud: {peak}");
        // After the release, a quiet signal passes unchanged.
        let mut limiter = Limiter::default();
        let mut quiet: Vec<f32> = (0..4800).map(|i| 0.2 * tone(i, 440.0)).collect();
        let original = quiet.clone();
        limiter.process(&mut quiet);
        assert_eq!(quiet, original);
        let mut bad = [f32::NAN, f32::INFINITY, 0.5];
        limiter.process(&mut bad);
        assert!(bad.iter().all(|s| s.is_finite() && s.abs() <= CEILING));
    }
}
