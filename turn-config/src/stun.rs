//! A zero-copy STUN codec (RFC 8489) with the TURN attributes (RFC 8656) and
//! ChannelData framing (RFC 8656 §12.4).
//!
//! Parsing never allocates and never panics: [`Message::parse`] validates the
//! header and walks every attribute once, after which attribute values are
//! borrowed slices of the input. Writing goes through [`MessageWriter`]
//! (control messages, a `Vec` each) or, for relayed data, through
//! [`write_data_indication_header`] and [`write_channel_data_header`], which
//! put a header in front of a payload already sitting in the driver's buffer.
//!
//! Why our own codec: the relay touches only a dozen attributes, must not
//! allocate per relayed packet, and must treat every byte from a peer as
//! hostile; a small codec we fuzz (`fuzz/`) is easier to keep to that than a
//! general one.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// RFC 8489 §5: the fixed value in every STUN header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Length of the ChannelData header.
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// The longest header [`write_data_indication_header`] writes (IPv6 peer).
pub const MAX_DATA_INDICATION_HEADER_LEN: usize = HEADER_LEN + 4 + 20 + 4;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// STUN methods used by TURN (RFC 8656 §17).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    /// RFC 5766 drafts; coturn's client may send it (`-a`). Ignored.
    pub const BANDWIDTH: u16 = 0x0010;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;

    /// Comprehension-required attributes (type < 0x8000) this relay understands
    /// or deliberately ignores; any other one in a request earns a 420.
    pub const UNDERSTOOD: &[u16] = &[
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        CHANNEL_NUMBER,
        LIFETIME,
        BANDWIDTH,
        XOR_PEER_ADDRESS,
        DATA,
        REALM,
        NONCE,
        XOR_RELAYED_ADDRESS,
        REQUESTED_ADDRESS_FAMILY,
        EVEN_PORT,
        REQUESTED_TRANSPORT,
        DONT_FRAGMENT,
        XOR_MAPPED_ADDRESS,
        RESERVATION_TOKEN,
        PRIORITY,
        USE_CANDIDATE,
    ];
}

/// The class bits of a STUN message type (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// The 96-bit transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// Why bytes are not a STUN message or a ChannelData message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a header")]
    TooShort,
    #[error("not a STUN message (leading bits or magic cookie)")]
    NotStun,
    #[error("the length field disagrees with the datagram")]
    BadLength,
    #[error("an attribute runs past the end of the message")]
    TruncatedAttribute,
    #[error("an attribute value is malformed")]
    BadAttribute,
    #[error("the FINGERPRINT does not match")]
    BadFingerprint,
    #[error("a channel number outside 0x4000..=0x7FFF")]
    BadChannel,
}

/// A parsed STUN message borrowing its input.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    bytes: &'a [u8],
    method: u16,
    class: Class,
    transaction_id: TransactionId,
    /// Offset of MESSAGE-INTEGRITY's TLV, if present.
    integrity_at: Option<usize>,
    has_fingerprint: bool,
}

/// What kind of message a buffer holds, judged by its first two bits (RFC 8656 §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    Other,
}

/// Classifies by the two leading bits: `00` STUN, `01` ChannelData.
pub fn kind(bytes: &[u8]) -> Kind {
    match bytes.first().map(|b| b >> 6) {
        Some(0) => Kind::Stun,
        Some(1) => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// For a stream transport: the length of the complete frame at the start of
/// `bytes` (STUN message, or ChannelData padded to 4 bytes as RFC 8656 §12.5
/// requires over TCP), or `None` while its header is incomplete.
pub fn stream_frame_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 4 {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    match kind(bytes) {
        Kind::Stun => Some(HEADER_LEN + length),
        // Kind::Other also lands here; the caller rejects it as ChannelData.
        _ => Some(CHANNEL_DATA_HEADER_LEN + length.next_multiple_of(4)),
    }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

impl<'a> Message<'a> {
    /// Parses and validates a whole message: header, every attribute's bounds,
    /// and the FINGERPRINT when there is one.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        let message_type = be16(bytes, 0);
        let cookie = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if message_type & 0xC000 != 0 || cookie != MAGIC_COOKIE {
            return Err(ParseError::NotStun);
        }
        let length = usize::from(be16(bytes, 2));
        if length % 4 != 0 || HEADER_LEN + length != bytes.len() {
            return Err(ParseError::BadLength);
        }
        let class = match ((message_type >> 4) & 1, (message_type >> 8) & 1) {
            (0, 0) => Class::Request,
            (1, 0) => Class::Indication,
            (0, 1) => Class::Success,
            _ => Class::Error,
        };
        let method = (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80);
        let mut transaction_id = [0u8; 12];
        transaction_id.copy_from_slice(&bytes[8..20]);
        let mut message = Message {
            bytes,
            method,
            class,
            transaction_id: TransactionId(transaction_id),
            integrity_at: None,
            has_fingerprint: false,
        };
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            if bytes.len() - at < 4 {
                return Err(ParseError::TruncatedAttribute);
            }
            let typ = be16(bytes, at);
            let len = usize::from(be16(bytes, at + 2));
            let end = at + 4 + len;
            if end > bytes.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            match typ {
                attr::MESSAGE_INTEGRITY if message.integrity_at.is_none() => {
                    if len != 20 {
                        return Err(ParseError::BadAttribute);
                    }
                    message.integrity_at = Some(at);
                }
                attr::FINGERPRINT => {
                    if len != 4 || end.next_multiple_of(4) != bytes.len() {
                        return Err(ParseError::BadAttribute);
                    }
                    let expected = crc32(&bytes[..at], Some(at + 8 - HEADER_LEN)) ^ FINGERPRINT_XOR;
                    let got = u32::from_be_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
                    if expected != got {
                        return Err(ParseError::BadFingerprint);
                    }
                    message.has_fingerprint = true;
                }
                _ => {}
            }
            at = end.next_multiple_of(4);
        }
        if at != bytes.len() {
            // The last attribute's padding would run past the end.
            return Err(ParseError::TruncatedAttribute);
        }
        Ok(message)
    }

    pub fn method(&self) -> u16 {
        self.method
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn transaction_id(&self) -> TransactionId {
        self.transaction_id
    }

    /// The whole message.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Attributes in order as `(type, value, value offset)`, stopping at
    /// MESSAGE-INTEGRITY (RFC 8489 §14.5: what follows it, except
    /// FINGERPRINT, is ignored).
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            bytes: self.bytes,
            at: HEADER_LEN,
            end: self.integrity_at.unwrap_or(self.bytes.len()),
        }
    }

    /// The value of the first attribute of type `typ`.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// Whether a (valid) FINGERPRINT is present.
    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1 keyed with the long-term key) in
    /// constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_at else {
            return false;
        };
        let mac = integrity_mac(key, &self.bytes[..at], at + 24 - HEADER_LEN);
        mac.verify_slice(&self.bytes[at + 4..at + 24]).is_ok()
    }

    /// A comprehension-required attribute this relay does not understand.
    pub fn unknown_required(&self) -> Option<u16> {
        self.attributes()
            .map(|a| a.typ)
            .find(|t| *t < 0x8000 && !attr::UNDERSTOOD.contains(t))
    }

    /// The first XOR-address attribute of type `typ`, decoded.
    pub fn xor_address(&self, typ: u16) -> Option<Result<SocketAddr, ParseError>> {
        self.get(typ).map(|v| decode_xor_address(v, &self.transaction_id))
    }

    /// A 32-bit attribute value.
    pub fn u32_attr(&self, typ: u16) -> Option<Result<u32, ParseError>> {
        self.get(typ).map(|v| {
            <[u8; 4]>::try_from(v)
                .map(u32::from_be_bytes)
                .map_err(|_| ParseError::BadAttribute)
        })
    }

    /// A UTF-8 text attribute (USERNAME, REALM, NONCE).
    pub fn text(&self, typ: u16) -> Option<Result<&'a str, ParseError>> {
        self.get(typ)
            .map(|v| std::str::from_utf8(v).map_err(|_| ParseError::BadAttribute))
    }
}

/// One attribute.
#[derive(Debug, Clone, Copy)]
pub struct Attribute<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Where `value` starts in the message.
    pub offset: usize,
}

/// Iterator over a validated message's attributes.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Attribute<'a>> {
        // Bounds were checked by `Message::parse`; `get` keeps this panic-free anyway.
        if self.at + 4 > self.end {
            return None;
        }
        let header = self.bytes.get(self.at..self.at + 4)?;
        let typ = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let offset = self.at + 4;
        let value = self.bytes.get(offset..offset + len)?;
        self.at = (offset + len).next_multiple_of(4);
        Some(Attribute { typ, value, offset })
    }
}

/// Decodes an XOR-MAPPED/PEER/RELAYED-ADDRESS value (RFC 8489 §14.2).
pub fn decode_xor_address(value: &[u8], transaction_id: &TransactionId) -> Result<SocketAddr, ParseError> {
    if value.len() < 4 {
        return Err(ParseError::BadAttribute);
    }
    let port = be16(value, 2) ^ (MAGIC_COOKIE >> 16) as u16;
    match (value[1], value.len()) {
        (0x01, 8) => {
            let raw = u32::from_be_bytes([value[4], value[5], value[6], value[7]]) ^ MAGIC_COOKIE;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(raw)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(&transaction_id.0);
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ mask[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(ParseError::BadAttribute),
    }
}

/// Encodes an XOR address value into `out` (8 or 20 bytes); returns its length.
fn encode_xor_address(addr: SocketAddr, transaction_id: &TransactionId, out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    out[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(&transaction_id.0);
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ mask[i];
            }
            20
        }
    }
}

/// HMAC-SHA1 over `prefix` with the header's length field replaced by `length`.
fn integrity_mac(key: &[u8], prefix: &[u8], length: usize) -> Hmac<Sha1> {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(&prefix[..2]);
    mac.update(&(length as u16).to_be_bytes());
    mac.update(&prefix[4..]);
    mac
}

/// Writes a STUN message: header, then attributes, then optionally
/// MESSAGE-INTEGRITY and FINGERPRINT (which must come last, in that order).
#[derive(Debug)]
pub struct MessageWriter {
    buf: Vec<u8>,
    transaction_id: TransactionId,
}

impl MessageWriter {
    pub fn new(method: u16, class: Class, transaction_id: TransactionId) -> Self {
        let class_bits = match class {
            Class::Request => 0x0000,
            Class::Indication => 0x0010,
            Class::Success => 0x0100,
            Class::Error => 0x0110,
        };
        let message_type = (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class_bits;
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction_id.0);
        Self { buf, transaction_id }
    }

    fn set_length(&mut self, length: usize) {
        let length = (length as u16).to_be_bytes();
        self.buf[2] = length[0];
        self.buf[3] = length[1];
    }

    /// Appends an attribute, padding it to 4 bytes. Values over 64 KiB are cut
    /// (none of ours comes near).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(0xFFF0)];
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        let length = self.buf.len() - HEADER_LEN;
        self.set_length(length);
        self
    }

    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut value = [0u8; 20];
        let len = encode_xor_address(addr, &self.transaction_id, &mut value);
        self.attr(typ, &value[..len])
    }

    pub fn u32_attr(&mut self, typ: u16, value: u32) -> &mut Self {
        self.attr(typ, &value.to_be_bytes())
    }

    /// ERROR-CODE (RFC 8489 §14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut value = Vec::with_capacity(4 + reason.len());
        value.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        value.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &value)
    }

    /// MESSAGE-INTEGRITY with the long-term key.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let length = self.buf.len() + 24 - HEADER_LEN;
        let mac = integrity_mac(key, &self.buf, length).finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// FINGERPRINT: CRC-32 of everything before it, XOR 0x5354554e.
    pub fn fingerprint(&mut self) -> &mut Self {
        let length = self.buf.len() + 8 - HEADER_LEN;
        let crc = crc32(&self.buf, Some(length)) ^ FINGERPRINT_XOR;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Writes a Data indication header (XOR-PEER-ADDRESS, then DATA's TLV header)
/// so that it ends exactly at `payload_start` in `buf`, and zero padding after
/// the payload. Returns the range of the whole message, or `None` when `buf`
/// lacks head or tail room.
pub fn write_data_indication_header(
    buf: &mut [u8],
    payload_start: usize,
    payload_len: usize,
    peer: SocketAddr,
    transaction_id: TransactionId,
) -> Option<std::ops::Range<usize>> {
    let mut address = [0u8; 20];
    let address_len = encode_xor_address(peer, &transaction_id, &mut address);
    let header_len = HEADER_LEN + 4 + address_len + 4;
    let start = payload_start.checked_sub(header_len)?;
    let padded = payload_len.next_multiple_of(4);
    let end = payload_start.checked_add(padded)?;
    if end > buf.len() || payload_len > 0xFFFF - 64 {
        return None;
    }
    let header = &mut buf[start..payload_start];
    let message_type: u16 = 0x0010 | method::DATA; // indication, Data
    let length = (4 + address_len + 4 + padded) as u16;
    header[0..2].copy_from_slice(&message_type.to_be_bytes());
    header[2..4].copy_from_slice(&length.to_be_bytes());
    header[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    header[8..20].copy_from_slice(&transaction_id.0);
    header[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    header[22..24].copy_from_slice(&(address_len as u16).to_be_bytes());
    header[24..24 + address_len].copy_from_slice(&address[..address_len]);
    let data_at = 24 + address_len;
    header[data_at..data_at + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    header[data_at + 2..data_at + 4].copy_from_slice(&(payload_len as u16).to_be_bytes());
    buf[payload_start + payload_len..end].fill(0);
    Some(start..end)
}

/// Writes a ChannelData header in the 4 bytes before `payload_start`; with
/// `pad` (stream transports) also zero padding to 4 bytes after the payload.
/// Returns the range of the whole message, or `None` when `buf` lacks room.
pub fn write_channel_data_header(
    buf: &mut [u8],
    payload_start: usize,
    payload_len: usize,
    channel: u16,
    pad: bool,
) -> Option<std::ops::Range<usize>> {
    let start = payload_start.checked_sub(CHANNEL_DATA_HEADER_LEN)?;
    let end = payload_start.checked_add(if pad {
        payload_len.next_multiple_of(4)
    } else {
        payload_len
    })?;
    if end > buf.len() || payload_len > 0xFFFF {
        return None;
    }
    buf[start..start + 2].copy_from_slice(&channel.to_be_bytes());
    buf[start + 2..payload_start].copy_from_slice(&(payload_len as u16).to_be_bytes());
    buf[payload_start + payload_len..end].fill(0);
    Some(start..end)
}

/// A parsed ChannelData message: `(channel number, payload range)`.
///
/// Trailing bytes beyond the announced length (padding) are allowed; a
/// length running past the end is not.
pub fn parse_channel_data(bytes: &[u8]) -> Result<(u16, std::ops::Range<usize>), ParseError> {
    if bytes.len() < CHANNEL_DATA_HEADER_LEN {
        return Err(ParseError::TooShort);
    }
    let channel = be16(bytes, 0);
    if !(0x4000..=0x7FFF).contains(&channel) {
        return Err(ParseError::BadChannel);
    }
    let length = usize::from(be16(bytes, 2));
    if CHANNEL_DATA_HEADER_LEN + length > bytes.len() {
        return Err(ParseError::BadLength);
    }
    Ok((channel, CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + length))
}

/// CRC-32 (IEEE, as zlib), optionally with the STUN header's length field
/// (bytes 2..4) replaced by `length`.
fn crc32(bytes: &[u8], length: Option<usize>) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let length = length.map(|l| (l as u16).to_be_bytes());
    let mut crc = 0xFFFF_FFFFu32;
    for (i, &byte) in bytes.iter().enumerate() {
        let byte = match (i, length) {
            (2, Some(l)) => l[0],
            (3, Some(l)) => l[1],
            _ => byte,
        };
        crc = TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 §2.1: sample request with long-term... (short-term) credentials
    /// "evtj:h6vY" / "VOkJxbRl1RmTxUk/WvJxBt", with SOFTWARE, PRIORITY,
    /// ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY and FINGERPRINT.
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87,
        0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73, 0x74, 0x20, 0x63, 0x6c,
        0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f,
        0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76,
        0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
    ];

    #[test]
    fn rfc5769_sample_request() {
        let message = Message::parse(&RFC5769_REQUEST).expect("valid sample");
        assert_eq!(message.method(), method::BINDING);
        assert_eq!(message.class(), Class::Request);
        assert_eq!(message.text(attr::USERNAME), Some(Ok("evtj:h6vY")));
        assert!(message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!message.verify_integrity(b"wrong"));
        let mut broken = RFC5769_REQUEST;
        broken[30] ^= 1;
        assert_eq!(Message::parse(&broken).err(), Some(ParseError::BadFingerprint));
    }

    #[test]
    fn round_trip_with_integrity_and_fingerprint() {
        let tid = TransactionId([7; 12]);
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().expect("addr");
        let v4: SocketAddr = "192.0.2.1:32853".parse().expect("addr");
        let mut writer = MessageWriter::new(method::ALLOCATE, Class::Success, tid);
        writer
            .xor_address(attr::XOR_RELAYED_ADDRESS, v6)
            .xor_address(attr::XOR_MAPPED_ADDRESS, v4)
            .u32_attr(attr::LIFETIME, 600)
            .attr(attr::SOFTWARE, b"odd")
            .integrity(b"key")
            .fingerprint();
        let bytes = writer.finish();
        let message = Message::parse(&bytes).expect("parses");
        assert_eq!(message.method(), method::ALLOCATE);
        assert_eq!(message.class(), Class::Success);
        assert_eq!(message.transaction_id(), tid);
        assert_eq!(message.xor_address(attr::XOR_RELAYED_ADDRESS), Some(Ok(v6)));
        assert_eq!(message.xor_address(attr::XOR_MAPPED_ADDRESS), Some(Ok(v4)));
        assert_eq!(message.u32_attr(attr::LIFETIME), Some(Ok(600)));
        assert_eq!(message.get(attr::SOFTWARE), Some(&b"odd"[..]));
        assert!(message.verify_integrity(b"key"));
        assert!(!message.verify_integrity(b"other"));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut writer = MessageWriter::new(method::SEND, Class::Indication, TransactionId([1; 12]));
        writer
            .xor_address(attr::XOR_PEER_ADDRESS, "198.51.100.2:9".parse().expect("addr"))
            .attr(attr::DATA, b"hello");
        let bytes = writer.finish();
        assert!(Message::parse(&bytes).is_ok());
        for len in 0..bytes.len() {
            assert!(Message::parse(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
        // A length field that lies about the attributes.
        let mut lying = bytes.clone();
        lying[22..24].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(Message::parse(&lying).err(), Some(ParseError::TruncatedAttribute));
    }

    #[test]
    fn data_indication_written_in_place_parses() {
        let peer: SocketAddr = "[2001:db8::7]:4242".parse().expect("addr");
        let mut buf = vec![0xAAu8; 100 + 5 + 3];
        buf[100..105].copy_from_slice(b"media");
        let range = write_data_indication_header(&mut buf, 100, 5, peer, TransactionId([3; 12])).expect("room");
        let message = Message::parse(&buf[range]).expect("parses");
        assert_eq!(message.method(), method::DATA);
        assert_eq!(message.class(), Class::Indication);
        assert_eq!(message.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(peer)));
        assert_eq!(message.get(attr::DATA), Some(&b"media"[..]));
        assert!(write_data_indication_header(&mut buf, 10, 5, peer, TransactionId([3; 12])).is_none());
    }

    #[test]
    fn channel_data() {
        let mut buf = [0u8; 4 + 5 + 3];
        buf[4..9].copy_from_slice(b"hello");
        let range = write_channel_data_header(&mut buf, 4, 5, 0x4001, true).expect("room");
        assert_eq!(range, 0..12);
        assert_eq!(stream_frame_len(&buf), Some(12));
        assert_eq!(parse_channel_data(&buf), Ok((0x4001, 4..9)));
        assert_eq!(parse_channel_data(&buf[..8]), Err(ParseError::BadLength));
        assert_eq!(parse_channel_data(&buf[..3]), Err(ParseError::TooShort));
        assert_eq!(parse_channel_data(&[0x80, 0, 0, 0]), Err(ParseError::BadChannel));
    }
}
