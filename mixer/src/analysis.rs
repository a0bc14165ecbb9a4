//! Frequency analysis for tests and benchmarks: how strongly a tone is present.

/// The amplitude of the `freq` Hz component of `samples` (sampled at `rate`),
/// by the Goertzel algorithm: a full-scale sine at exactly `freq` gives ≈ its
/// amplitude, other frequencies ≈ 0.
pub fn tone_amplitude(samples: &[f32], freq: f32, rate: f32) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let omega = std::f32::consts::TAU * freq / rate;
    let coeff = 2.0 * omega.cos();
    let (mut s1, mut s2) = (0f64, 0f64);
    for &x in samples {
        let s0 = f64::from(x) + f64::from(coeff) * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - f64::from(coeff) * s1 * s2;
    (2.0 * power.max(0.0).sqrt() / samples.len() as f64) as f32
}

/// A sine of `amplitude` at `freq` Hz, `n` samples at 48 kHz starting at sample `offset`.
pub fn sine(freq: f32, amplitude: f32, offset: u64, out: &mut [f32]) {
    for (i, sample) in out.iter_mut().enumerate() {
        let t = (offset + i as u64) as f64 / 48_000.0;
        *sample = amplitude * (std::f64::consts::TAU * f64::from(freq) * t).sin() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tone_it_is_asked_about() {
        let mut pcm = vec![0f32; 9600];
        sine(600.0, 0.5, 0, &mut pcm);
        assert!((tone_amplitude(&pcm, 600.0, 48_000.0) - 0.5).abs() < 0.02);
        assert!(tone_amplitude(&pcm, 900.0, 48_000.0) < 0.01);
    }
}
