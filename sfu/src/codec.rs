//! Just enough codec knowledge to forward video: is this packet the start of a keyframe?

use str0m::format::Codec;

/// Whether an RTP payload of `codec` starts a keyframe. Audio always "does".
pub fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => vp8_keyframe_start(payload),
        Codec::H264 => h264_keyframe(payload),
        Codec::Vp9 => vp9_keyframe_start(payload),
        c if c.is_audio() => true,
        // Unknown video codecs: forward from the first packet on.
        _ => true,
    }
}

/// VP8 (RFC 7741 §4.2–4.3): the payload descriptor, then on the first packet of
/// a partition 0 the payload header whose P bit (bit 0 of byte 0) is 0 for a keyframe.
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&first) = p.first() else { return false };
    let extended = first & 0x80 != 0;
    let start = first & 0x10 != 0;
    let partition = first & 0x0f;
    if !start || partition != 0 {
        return false;
    }
    let mut i = 1;
    if extended {
        let Some(&x) = p.get(i) else { return false };
        i += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let Some(&pid) = p.get(i) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    p.get(i).is_some_and(|header| header & 0x01 == 0)
}

/// H.264 (RFC 6184): an IDR slice (5) or SPS (7), alone, first in a STAP-A, or
/// at the start of an FU-A.
fn h264_keyframe(p: &[u8]) -> bool {
    let Some(&first) = p.first() else { return false };
    match first & 0x1f {
        5 | 7 => true,
        24 => {
            // STAP-A: [header][size16][nal]...
            let mut i = 1;
            while i + 2 < p.len() {
                let size = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
                let Some(&nal) = p.get(i + 2) else { return false };
                if matches!(nal & 0x1f, 5 | 7) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => p.get(1).is_some_and(|fu| fu & 0x80 != 0 && matches!(fu & 0x1f, 5 | 7)),
        _ => false,
    }
}

/// VP9 (RFC 9628): B (start of frame) set and P (inter-picture predicted) clear.
fn vp9_keyframe_start(p: &[u8]) -> bool {
    p.first().is_some_and(|d| d & 0x08 != 0 && d & 0x40 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8() {
        assert!(starts_keyframe(Codec::Vp8, &[0x10, 0x00]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x10, 0x01]), "P bit set: interframe");
        assert!(
            !starts_keyframe(Codec::Vp8, &[0x00, 0x00]),
            "not the start of a partition"
        );
        // Extended descriptor with a 15-bit picture id, then a keyframe header.
        assert!(starts_keyframe(Codec::Vp8, &[0x90, 0x80, 0x81, 0x23, 0x00]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x90, 0x80]), "truncated");
        assert!(!starts_keyframe(Codec::Vp8, &[]));
    }

    #[test]
    fn h264() {
        assert!(starts_keyframe(Codec::H264, &[0x65]));
        assert!(starts_keyframe(
            Codec::H264,
            &[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x01, 0x68]
        ));
        assert!(starts_keyframe(Codec::H264, &[0x7c, 0x85]));
        assert!(!starts_keyframe(Codec::H264, &[0x7c, 0x05]), "FU-A continuation");
        assert!(!starts_keyframe(Codec::H264, &[0x61]));
        assert!(!starts_keyframe(Codec::H264, &[0x78, 0xff]), "truncated STAP-A");
    }

    #[test]
    fn audio_always() {
        assert!(starts_keyframe(Codec::Opus, &[]));
    }
}
