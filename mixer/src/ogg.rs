//! Ogg/Opus files (RFC 7845 on the Ogg container of RFC 3533): a streaming
//! writer and a reader (for checking recordings).
//!
//! The writer produces bytes, never touches a file: the first page holds the
//! `OpusHead` identification header (beginning of stream), the second the
//! `OpusTags` comment header, then audio pages of up to [`PACKETS_PER_PAGE`]
//! packets (one second of 20 ms frames), each with the granule position — the
//! count of 48 kHz samples decoded up to its last packet's end; the first
//! `pre_skip` of them (the encoder's priming) are not played, so the playback
//! duration is the last granule minus the pre-skip (RFC 7845 §4). The last page
//! carries the end-of-stream flag.

/// Audio packets per page: a page a second keeps a crash's loss small.
pub const PACKETS_PER_PAGE: usize = 50;

const CAPTURE: &[u8; 4] = b"OggS";
const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

/// The Ogg CRC-32: polynomial 0x04c11db7, MSB first, no reflection, initial 0.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
};

fn crc32(data: &[u8]) -> u32 {
    data.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[usize::from(((crc >> 24) as u8) ^ b)]
    })
}

/// Writes one mono Ogg/Opus stream.
#[derive(Debug)]
pub struct OggOpusWriter {
    serial: u32,
    pre_skip: u16,
    sequence: u32,
    granule: u64,
    /// Segment table and body of the page being filled.
    lacing: Vec<u8>,
    body: Vec<u8>,
    packets: usize,
    out: Vec<u8>,
    finished: bool,
}

impl OggOpusWriter {
    /// Starts a stream: writes the two header pages. `pre_skip` is the
    /// encoder's lookahead in 48 kHz samples.
    pub fn new(serial: u32, pre_skip: u16, vendor: &str) -> Self {
        let mut writer = Self {
            serial,
            pre_skip,
            sequence: 0,
            granule: 0,
            lacing: Vec::with_capacity(255),
            body: Vec::with_capacity(8 * 1024),
            packets: 0,
            out: Vec::new(),
            finished: false,
        };
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channels
        head.extend_from_slice(&pre_skip.to_le_bytes());
        head.extend_from_slice(&48_000u32.to_le_bytes()); // input sample rate (informative)
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family 0: mono/stereo
        writer.page(FLAG_BOS, 0, &[&head]);
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes()); // no user comments
        writer.page(0, 0, &[&tags]);
        writer
    }

    /// Adds one opus packet that decodes to `samples` samples at 48 kHz.
    pub fn push(&mut self, packet: &[u8], samples: u32) {
        if self.finished || packet.is_empty() || packet.len() > 255 * 250 {
            return;
        }
        let segments = packet.len() / 255 + 1;
        if self.lacing.len() + segments > 255 {
            self.flush(0);
        }
        self.lacing.extend(std::iter::repeat_n(255u8, packet.len() / 255));
        self.lacing.push((packet.len() % 255) as u8);
        self.body.extend_from_slice(packet);
        self.granule += u64::from(samples);
        self.packets += 1;
        if self.packets >= PACKETS_PER_PAGE {
            self.flush(0);
        }
    }

    /// Ends the stream: the last page, flagged end-of-stream.
    pub fn finish(&mut self) {
        if !self.finished {
            self.flush(FLAG_EOS);
            self.finished = true;
        }
    }

    /// The bytes written so far and not yet taken.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The granule position so far: the samples the packets decode to (the
    /// first `pre_skip` of which are the encoder's priming, not played).
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Samples of audio written (without the pre-skip).
    pub fn duration_samples(&self) -> u64 {
        self.granule.saturating_sub(u64::from(self.pre_skip))
    }

    fn flush(&mut self, flags: u8) {
        if self.lacing.is_empty() && flags & FLAG_EOS == 0 {
            return;
        }
        let lacing = std::mem::take(&mut self.lacing);
        let body = std::mem::take(&mut self.body);
        self.write_page(flags, self.granule, &lacing, &body);
        self.lacing = lacing;
        self.lacing.clear();
        self.body = body;
        self.body.clear();
        self.packets = 0;
    }

    /// A page holding whole packets (each shorter than 255 × 255 bytes).
    fn page(&mut self, flags: u8, granule: u64, packets: &[&[u8]]) {
        let mut lacing = Vec::new();
        let mut body = Vec::new();
        for packet in packets {
            lacing.extend(std::iter::repeat_n(255u8, packet.len() / 255));
            lacing.push((packet.len() % 255) as u8);
            body.extend_from_slice(packet);
        }
        self.write_page(flags, granule, &lacing, &body);
    }

    fn write_page(&mut self, flags: u8, granule: u64, lacing: &[u8], body: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(CAPTURE);
        self.out.push(0); // version
        self.out.push(flags);
        self.out.extend_from_slice(&granule.to_le_bytes());
        self.out.extend_from_slice(&self.serial.to_le_bytes());
        self.out.extend_from_slice(&self.sequence.to_le_bytes());
        self.out.extend_from_slice(&[0; 4]); // CRC, filled below
        self.out.push(lacing.len() as u8);
        self.out.extend_from_slice(lacing);
        self.out.extend_from_slice(body);
        let crc = crc32(&self.out[start..]);
        self.out[start + 22..start + 26].copy_from_slice(&crc.to_le_bytes());
        self.sequence += 1;
    }
}

/// A parsed Ogg/Opus stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OggOpus {
    pub channels: u8,
    pub pre_skip: u16,
    pub vendor: String,
    /// The audio packets, in order.
    pub packets: Vec<Vec<u8>>,
    /// The granule position of the last page.
    pub final_granule: u64,
    /// Whether the last page is flagged end-of-stream.
    pub ended: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OggError {
    #[error("truncated page")]
    Truncated,
    #[error("no Ogg capture pattern at byte {0}")]
    NoCapture(usize),
    #[error("page {0} fails its CRC")]
    BadCrc(u32),
    #[error("missing or malformed {0}")]
    BadHeader(&'static str),
}

/// Reads a single-stream Ogg/Opus file (checks every page's CRC).
pub fn read(bytes: &[u8]) -> Result<OggOpus, OggError> {
    let mut packets: Vec<Vec<u8>> = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut final_granule = 0;
    let mut ended = false;
    while at < bytes.len() {
        let header = bytes.get(at..at + 27).ok_or(OggError::Truncated)?;
        if &header[..4] != CAPTURE {
            return Err(OggError::NoCapture(at));
        }
        let flags = header[5];
        let granule = u64::from_le_bytes(header[6..14].try_into().map_err(|_| OggError::Truncated)?);
        let sequence = u32::from_le_bytes(header[18..22].try_into().map_err(|_| OggError::Truncated)?);
        let crc = u32::from_le_bytes(header[22..26].try_into().map_err(|_| OggError::Truncated)?);
        let count = usize::from(header[26]);
        let lacing = bytes.get(at + 27..at + 27 + count).ok_or(OggError::Truncated)?;
        let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
        let end = at + 27 + count + body_len;
        let page = bytes.get(at..end).ok_or(OggError::Truncated)?;
        let mut zeroed = page.to_vec();
        zeroed[22..26].fill(0);
        if crc32(&zeroed) != crc {
            return Err(OggError::BadCrc(sequence));
        }
        if flags & FLAG_CONTINUED == 0 && !partial.is_empty() {
            partial.clear(); // an unfinished packet that was never continued
        }
        let mut body = &page[27 + count..];
        for &l in lacing {
            let (segment, rest) = body.split_at(usize::from(l));
            partial.extend_from_slice(segment);
            body = rest;
            if l < 255 {
                packets.push(std::mem::take(&mut partial));
            }
        }
        final_granule = granule;
        ended = flags & FLAG_EOS != 0;
        at = end;
    }
    let mut packets = packets.into_iter();
    let head = packets.next().ok_or(OggError::BadHeader("OpusHead"))?;
    if head.len() < 19 || &head[..8] != b"OpusHead" {
        return Err(OggError::BadHeader("OpusHead"));
    }
    let tags = packets.next().ok_or(OggError::BadHeader("OpusTags"))?;
    if tags.len() < 16 || &tags[..8] != b"OpusTags" {
        return Err(OggError::BadHeader("OpusTags"));
    }
    let vendor_len = u32::from_le_bytes([tags[8], tags[9], tags[10], tags[11]]) as usize;
    let vendor = tags.get(12..12 + vendor_len).ok_or(OggError::BadHeader("OpusTags"))?;
    Ok(OggOpus {
        channels: head[9],
        pre_skip: u16::from_le_bytes([head[10], head[11]]),
        vendor: String::from_utf8_lossy(vendor).into_owned(),
        packets: packets.collect(),
        final_granule,
        ended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_ogg_reference() {
        // CRC-32 with polynomial 0x04c11db7, no reflection, initial value and
        // final XOR 0: the check value over "123456789".
        assert_eq!(crc32(b"123456789"), 0x89a1_897f);
    }

    #[test]
    fn writes_and_reads_back_pages_with_granules() {
        let mut writer = OggOpusWriter::new(7, 312, "switchboard");
        let mut file = writer.take();
        let packets: Vec<Vec<u8>> = (0..120u32)
            .map(|i| vec![i as u8; 40 + (i as usize * 7) % 600])
            .collect();
        for p in &packets {
            writer.push(p, 960);
        }
        file.extend(writer.take());
        writer.finish();
        file.extend(writer.take());
        let read = read(&file).expect("reads back");
        assert_eq!(read.packets, packets);
        assert_eq!(read.pre_skip, 312);
        assert_eq!(read.channels, 1);
        assert_eq!(read.vendor, "switchboard");
        assert_eq!(read.final_granule, 120 * 960);
        assert!(read.ended);
        // Header pages, then ceil(120 / 50) audio pages (the last one ends the stream).
        assert_eq!(file.windows(4).filter(|w| w == b"OggS").count(), 2 + 3);
        let mut corrupt = file.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(matches!(super::read(&corrupt), Err(OggError::BadCrc(_))));
        assert_eq!(super::read(&file[..30]), Err(OggError::Truncated));
    }
}
