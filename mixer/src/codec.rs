//! Opus (RFC 6716) at 48 kHz, mono: the decoder with packet-loss concealment
//! and in-band FEC, and the encoder, over the system libopus.
//!
//! Mono is enough for a conference mix: a stereo packet decodes to its downmix.

use opusic_c::{Application, Bitrate, Channels, Decoder, Encoder, ErrorCode, SampleRate};

/// Samples per second.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in the longest opus packet (120 ms).
pub const MAX_PACKET_SAMPLES: usize = 5_760;
/// The largest opus packet (RFC 6716 §3.4: 1275 bytes per frame; a few frames with padding).
pub const MAX_PACKET_BYTES: usize = 1_500;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("opus: {}", .0.message())]
    Opus(ErrorCode),
}

impl From<ErrorCode> for CodecError {
    fn from(code: ErrorCode) -> Self {
        Self::Opus(code)
    }
}

/// One input's decoder.
pub struct OpusDecoder {
    inner: Decoder,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpusDecoder")
    }
}

impl OpusDecoder {
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self {
            inner: Decoder::new(Channels::Mono, SampleRate::Hz48000)?,
        })
    }

    /// Decodes one packet into `out` (room for [`MAX_PACKET_SAMPLES`]); returns the samples written.
    pub fn decode(&mut self, packet: &[u8], out: &mut [f32]) -> Result<usize, CodecError> {
        if packet.is_empty() {
            // An empty packet would mean "lost" to libopus: not what the caller asked.
            return Err(CodecError::Opus(ErrorCode::InvalidPacket));
        }
        Ok(self.inner.decode_float_to_slice(packet, out, false)?)
    }

    /// Conceals one lost frame of `out.len()` samples (a multiple of 2.5 ms).
    pub fn conceal(&mut self, out: &mut [f32]) -> Result<usize, CodecError> {
        Ok(self.inner.decode_float_to_slice(&[], out, false)?)
    }

    /// Recovers a lost frame of `out.len()` samples from the in-band FEC data of
    /// the packet after it (concealment when that packet carries none).
    pub fn recover(&mut self, next: &[u8], out: &mut [f32]) -> Result<usize, CodecError> {
        Ok(self.inner.decode_float_to_slice(next, out, true)?)
    }

    pub fn reset(&mut self) {
        let _ = self.inner.reset();
    }
}

/// One mix's encoder (20 ms frames, VoIP tuning).
pub struct OpusEncoder {
    inner: Encoder,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpusEncoder")
    }
}

impl OpusEncoder {
    pub fn new(bitrate_bps: u32, complexity: u8) -> Result<Self, CodecError> {
        let mut inner = Encoder::new(Channels::Mono, SampleRate::Hz48000, Application::Voip)?;
        inner.set_bitrate(Bitrate::Value(bitrate_bps))?;
        inner.set_complexity(complexity.min(10))?;
        Ok(Self { inner })
    }

    /// Encodes one frame (120, 240, 480, 960, 1920 or 2880 samples) into `out`; returns its length.
    pub fn encode(&mut self, pcm: &[f32], out: &mut [u8]) -> Result<usize, CodecError> {
        Ok(self.inner.encode_float_to_slice(pcm, out)?)
    }

    /// Samples the encoder delays its input by (the Ogg pre-skip).
    pub fn lookahead(&mut self) -> u32 {
        self.inner.get_look_ahead().unwrap_or(312)
    }

    pub fn reset(&mut self) {
        let _ = self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FRAME_SAMPLES;

    #[test]
    fn round_trip_and_concealment() {
        let mut encoder = OpusEncoder::new(32_000, 5).expect("encoder");
        let mut decoder = OpusDecoder::new().expect("decoder");
        let pcm: Vec<f32> = (0..FRAME_SAMPLES)
            .map(|i| 0.3 * (i as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin())
            .collect();
        let mut packet = [0u8; MAX_PACKET_BYTES];
        let mut out = vec![0f32; MAX_PACKET_SAMPLES];
        for _ in 0..5 {
            let len = encoder.encode(&pcm, &mut packet).expect("encode");
            assert!(len > 0 && len < 400);
            assert_eq!(decoder.decode(&packet[..len], &mut out).expect("decode"), FRAME_SAMPLES);
        }
        assert_eq!(decoder.conceal(&mut out[..FRAME_SAMPLES]).expect("plc"), FRAME_SAMPLES);
        assert!(
            decoder.decode(&[], &mut out).is_err(),
            "an empty packet is not a packet"
        );
    }
}
