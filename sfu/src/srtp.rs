//! Our own SRTP sender for forwarded media: the hot path's short cut past str0m.
//!
//! str0m sends a written RTP packet on the session's next timeout, which runs
//! its ICE, DTLS, RTCP and pacer bookkeeping before it packetizes and
//! encrypts: most of the SFU's CPU in a fan-out. A forwarded packet needs
//! none of that (the forwarder has rewritten its numbers; nothing is paced
//! where no bandwidth is estimated), so the SFU builds the header, seals it
//! with the session's SRTP key and hands the datagram to the driver itself.
//! Audio is sealed so in every session, video in sessions without a
//! bandwidth estimate (str0m's estimator must see every packet it sends).
//!
//! - **Keys.** [`build_rtc`] gives str0m a DTLS provider that wraps its own and
//!   copies the keying material the handshake exports (RFC 5764 §4.2) into the
//!   session's [`KeySlot`]; [`Ciphers`] derives the session key and salt
//!   from it (RFC 3711 §4.3, AES-CM PRF).
//! - **Retransmission.** Video we seal is remembered ([`crate::nack`]); the
//!   subscriber's SRTCP is opened with its key ([`SrtcpOpener`], RFC 7714 §9)
//!   to read its NACKs, and the packets are sealed again. str0m still gets
//!   and checks every datagram.
//! - **Sealing.** AEAD_AES_128_GCM and AEAD_AES_256_GCM (RFC 7714 §8: the IV is
//!   the salt XOR SSRC, ROC and sequence number; the header is the associated
//!   data). A session that negotiated AES_CM_128_HMAC_SHA1_80 keeps str0m's path.
//! - **One sender per SSRC.** str0m keeps sending that SSRC's sender reports,
//!   and it only learns the stream's RTP time from packets written through it,
//!   so the SFU writes one packet a second of each such stream through str0m
//!   (`Sfu::forward`). Both paths number packets from the same forwarder, so
//!   str0m and we never seal under the same index; a resend of ours is the
//!   very packet first sealed under its index, byte for byte (same stream,
//!   same remembered fields), so AES-GCM never sees one nonce with two
//!   different messages.

use crate::nack::{History, Sent};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use str0m::config::{CryptoProvider, DtlsCert, DtlsVersion};
use str0m::crypto::dtls::{DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, ProtocolVersion, SrtpProfile};
use str0m::crypto::{AeadAes128GcmCipher, AeadAes256GcmCipher, CryptoError, SrtpProvider};
use str0m::media::Mid;
use str0m::net::{Protocol, Transmit};
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Rtc, RtcConfig};

/// The SRTP keying material of one session's DTLS handshake, once it is done.
#[derive(Clone, Default)]
pub(crate) struct KeySlot(Arc<Slot>);

#[derive(Default)]
struct Slot {
    keys: OnceLock<Keying>,
    /// The handshake exported keys again: str0m took the new ones, so ours
    /// are stale and the session's media goes back to str0m.
    rekeyed: AtomicBool,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("KeySlot")
            .field("set", &self.0.keys.get().is_some())
            .finish()
    }
}

struct Keying {
    /// client key | server key | client salt | server salt (RFC 5764 §4.2).
    material: Vec<u8>,
    profile: SrtpProfile,
    /// We are the DTLS client: our write key is the client's.
    client: bool,
}

impl KeySlot {
    /// Our halves of the session's SRTP and SRTCP keys and the peer's, if
    /// the handshake is done and the profile is one we seal ourselves.
    fn ciphers(&self) -> Option<Ciphers> {
        let keying = self.0.keys.get()?;
        let srtp = provider().srtp_provider;
        match keying.profile {
            SrtpProfile::AEAD_AES_128_GCM => Some(Ciphers {
                sender: keying.aead::<16>(srtp, keying.client, RTP_LABELS, true)?,
                rtcp_opener: SrtcpOpener::new(keying.aead::<16>(srtp, !keying.client, RTCP_LABELS, false)?),
                opener: keying.aead::<16>(srtp, !keying.client, RTP_LABELS, false)?,
                rtcp_sealer: SrtcpSealer::new(keying.aead::<16>(srtp, keying.client, RTCP_LABELS, true)?),
            }),
            SrtpProfile::AEAD_AES_256_GCM => Some(Ciphers {
                sender: keying.aead::<32>(srtp, keying.client, RTP_LABELS, true)?,
                rtcp_opener: SrtcpOpener::new(keying.aead::<32>(srtp, !keying.client, RTCP_LABELS, false)?),
                opener: keying.aead::<32>(srtp, !keying.client, RTP_LABELS, false)?,
                rtcp_sealer: SrtcpSealer::new(keying.aead::<32>(srtp, keying.client, RTCP_LABELS, true)?),
            }),
            _ => None,
        }
    }
}

/// One session's ciphers, each with its session key and salt: our SRTP and
/// SRTCP, and the peer's.
pub(crate) struct Ciphers {
    /// Seals our RTP.
    pub(crate) sender: Cipher,
    /// Opens the peer's RTP.
    pub(crate) opener: Cipher,
    pub(crate) rtcp_opener: SrtcpOpener,
    pub(crate) rtcp_sealer: SrtcpSealer,
}

impl Keying {
    /// The DTLS client's (`client`) or server's master key and salt (the
    /// AEAD profiles' salts are 12 bytes). Each side sends with its own.
    fn half<const KEY: usize>(&self, client: bool) -> Option<([u8; KEY], [u8; 12])> {
        let m = &self.material;
        if m.len() != 2 * KEY + 2 * 12 {
            return None;
        }
        let (key_at, salt_at) = if client { (0, 2 * KEY) } else { (KEY, 2 * KEY + 12) };
        Some((
            m[key_at..key_at + KEY].try_into().ok()?,
            m[salt_at..salt_at + 12].try_into().ok()?,
        ))
    }

    /// The session key and salt the DTLS client's (`client`) or server's
    /// master key derives under `labels` (RFC 3711 §4.3).
    fn session<const KEY: usize>(
        &self,
        srtp: &dyn SrtpProvider,
        client: bool,
        (key, salt): (u8, u8),
    ) -> Option<([u8; KEY], [u8; 12])> {
        let (master, master_salt) = self.half::<KEY>(client)?;
        Some((
            derive(srtp, &master, &master_salt, key),
            derive(srtp, &master, &master_salt, salt),
        ))
    }
}

impl Keying {
    /// An AES-GCM cipher (AES-128 or AES-256 by `KEY`) with the session key
    /// and salt of one side (`client`) under `labels`, for sealing or opening.
    fn aead<const KEY: usize>(
        &self,
        srtp: &dyn SrtpProvider,
        client: bool,
        labels: (u8, u8),
        encrypt: bool,
    ) -> Option<Cipher> {
        let (key, salt) = self.session::<KEY>(srtp, client, labels)?;
        let aead = if let Ok(key) = <[u8; 16]>::try_from(&key[..]) {
            Aead::Aes128(srtp.aead_aes_128_gcm().create_cipher(key, encrypt))
        } else {
            Aead::Aes256(srtp.aead_aes_256_gcm().create_cipher(key[..].try_into().ok()?, encrypt))
        };
        Some(Cipher { aead, salt })
    }
}

const LABEL_RTP_KEY: u8 = 0;
const LABEL_RTP_SALT: u8 = 2;
const LABEL_RTCP_KEY: u8 = 3;
const LABEL_RTCP_SALT: u8 = 5;
/// (key, salt) labels of SRTP and of SRTCP.
const RTP_LABELS: (u8, u8) = (LABEL_RTP_KEY, LABEL_RTP_SALT);
const RTCP_LABELS: (u8, u8) = (LABEL_RTCP_KEY, LABEL_RTCP_SALT);

/// RFC 3711 §4.3.1 with the AES-CM PRF (§4.3.3), key derivation rate 0: the
/// key stream of AES in counter mode under the master key (AES-128 or
/// AES-256 by its length), starting at (master salt XOR label at byte 7)
/// shifted left 16 bits.
fn derive<const N: usize>(srtp: &dyn SrtpProvider, master_key: &[u8], master_salt: &[u8], label: u8) -> [u8; N] {
    let mut block = [0u8; 16];
    block[..master_salt.len()].copy_from_slice(master_salt);
    block[7] ^= label;
    let mut out = [0u8; N];
    for (counter, chunk) in out.chunks_mut(16).enumerate() {
        block[14..].copy_from_slice(&(counter as u16).to_be_bytes());
        // The providers' ECB round may write a padding block after the first.
        let mut keystream = [0u8; 32];
        if master_key.len() == 32 {
            srtp.srtp_aes_256_ecb_round(master_key, &block, &mut keystream);
        } else {
            srtp.srtp_aes_128_ecb_round(master_key, &block, &mut keystream);
        }
        chunk.copy_from_slice(&keystream[..chunk.len()]);
    }
    out
}

/// AES-GCM under one session key and salt (RFC 7714): one direction's SRTP
/// or SRTCP.
pub(crate) struct Cipher {
    aead: Aead,
    salt: [u8; 12],
}

enum Aead {
    Aes128(Box<dyn AeadAes128GcmCipher>),
    Aes256(Box<dyn AeadAes256GcmCipher>),
}

/// The AEAD tag appended to each packet (RFC 7714 §7).
pub(crate) const TAG_LEN: usize = 16;

impl Cipher {
    /// The IV (RFC 7714 §8.1, §9.1): 00 00 | SSRC | the 48-bit index, XOR the salt.
    fn iv(&self, ssrc: u32, index: u64) -> [u8; 12] {
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[6..12].copy_from_slice(&index.to_be_bytes()[2..]);
        for (byte, salt) in iv.iter_mut().zip(self.salt) {
            *byte ^= salt;
        }
        iv
    }

    fn encrypt(&mut self, iv: &[u8; 12], aad: &[u8], plain: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        match &mut self.aead {
            Aead::Aes128(cipher) => cipher.encrypt(iv, aad, plain, out),
            Aead::Aes256(cipher) => cipher.encrypt(iv, aad, plain, out),
        }
    }

    fn decrypt(&mut self, iv: &[u8; 12], aad: &[&[u8]], sealed: &[u8], out: &mut [u8]) -> Result<usize, CryptoError> {
        match &mut self.aead {
            Aead::Aes128(cipher) => cipher.decrypt(iv, aad, sealed, out),
            Aead::Aes256(cipher) => cipher.decrypt(iv, aad, sealed, out),
        }
    }

    /// Encrypts `payload` behind the RTP header already in `packet` (which
    /// has room for nothing else yet) and appends the tag. `index` is the
    /// packet's SRTP index: the extended sequence number (ROC << 16 | SEQ).
    pub(crate) fn seal(
        &mut self,
        packet: &mut Vec<u8>,
        payload: &[u8],
        ssrc: u32,
        index: u64,
    ) -> Result<(), CryptoError> {
        let iv = self.iv(ssrc, index);
        let header_len = packet.len();
        packet.resize(header_len + payload.len() + TAG_LEN, 0);
        let (header, body) = packet.split_at_mut(header_len);
        self.encrypt(&iv, header, payload, body)
    }

    /// Decrypts the payload of an SRTP `packet` whose header (the associated
    /// data) is its first `header_len` bytes, under `index`, into `out`:
    /// `false` unless it is authentic.
    pub(crate) fn open(&mut self, packet: &[u8], header_len: usize, ssrc: u32, index: u64, out: &mut Vec<u8>) -> bool {
        let Some(len) = packet.len().checked_sub(header_len + TAG_LEN) else {
            return false;
        };
        let iv = self.iv(ssrc, index);
        let (header, sealed) = packet.split_at(header_len);
        out.clear();
        out.resize(len, 0);
        matches!(self.decrypt(&iv, &[header], sealed, out), Ok(n) if n == len)
    }
}

/// Opens SRTCP from the peer (AEAD, RFC 7714 §9) to read its feedback,
/// with replay protection (RFC 3711 §3.3.2): we act on it (resends) before
/// str0m has checked it, and a replayed NACK must not make us send again.
pub(crate) struct SrtcpOpener {
    cipher: Cipher,
    /// Replay windows by sender SSRC (each SSRC numbers its own SRTCP).
    windows: Vec<ReplayWindow>,
}

/// The highest SRTCP index accepted from one SSRC, and which of the 64 below it were.
struct ReplayWindow {
    ssrc: u32,
    highest: u32,
    seen: u64,
}

/// SSRCs whose SRTCP replay windows a session keeps (a browser sends RTCP
/// from a few: one per sending and per receiving stream).
const REPLAY_WINDOWS: usize = 64;

impl ReplayWindow {
    /// Records an index: `false` if it was seen before or is too old to
    /// tell (more than 64 behind the highest).
    fn fresh(&mut self, index: u32) -> bool {
        if index > self.highest {
            let ahead = index - self.highest;
            self.seen = if ahead >= 64 { 1 } else { (self.seen << ahead) | 1 };
            self.highest = index;
            return true;
        }
        let behind = self.highest - index;
        if behind >= 64 || self.seen & (1 << behind) != 0 {
            return false;
        }
        self.seen |= 1 << behind;
        true
    }
}

/// SRTCP's trailer: the E flag and the 31-bit SRTCP index.
const SRTCP_INDEX_LEN: usize = 4;

impl SrtcpOpener {
    fn new(cipher: Cipher) -> Self {
        Self {
            cipher,
            windows: Vec::new(),
        }
    }

    /// Records an authentic packet's SSRC and index: `false` for a replay.
    /// Windows are kept most recently used last; the least is dropped for a new SSRC.
    fn fresh(&mut self, ssrc: u32, index: u32) -> bool {
        if let Some(at) = self.windows.iter().position(|w| w.ssrc == ssrc) {
            let mut window = self.windows.remove(at);
            let fresh = window.fresh(index);
            self.windows.push(window);
            return fresh;
        }
        if self.windows.len() == REPLAY_WINDOWS {
            self.windows.remove(0);
        }
        self.windows.push(ReplayWindow {
            ssrc,
            highest: index,
            seen: 1,
        });
        true
    }

    /// The plain compound RTCP of an SRTCP packet into `out`, or `false` if
    /// it is not one of the peer's, authentic, encrypted and new.
    pub(crate) fn open(&mut self, packet: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(body_len) = packet.len().checked_sub(8 + TAG_LEN + SRTCP_INDEX_LEN) else {
            return false;
        };
        let (head, rest) = packet.split_at(8);
        let (sealed, trailer) = rest.split_at(body_len + TAG_LEN);
        if trailer[0] & 0x80 == 0 {
            return false; // not encrypted: nothing a browser sends
        }
        let ssrc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let index = u32::from_be_bytes([trailer[0] & 0x7f, trailer[1], trailer[2], trailer[3]]);
        // AAD: the first 8 bytes and the E flag with the index.
        let iv = self.cipher.iv(ssrc, index.into());
        out.clear();
        out.extend_from_slice(head);
        out.resize(8 + sealed.len(), 0);
        let mut aad = [0u8; 12];
        aad[..8].copy_from_slice(head);
        aad[8..].copy_from_slice(trailer);
        let opened = self.cipher.decrypt(&iv, &[&aad], sealed, &mut out[8..]);
        match opened {
            Ok(n) if n <= body_len && self.fresh(ssrc, index) => {
                out.truncate(8 + n);
                true
            }
            _ => false,
        }
    }
}

/// Seals our own RTCP (the receiver reports of [`crate::ingress`]) as SRTCP
/// (RFC 7714 §9), numbering it with its own SRTCP index. Only one sender
/// SSRC may use it: str0m seals its RTCP with the same key, under its own
/// SSRCs and indices, so ours must never be one of those.
pub(crate) struct SrtcpSealer {
    cipher: Cipher,
    /// The next SRTCP index (31 bits).
    index: u32,
}

impl SrtcpSealer {
    fn new(cipher: Cipher) -> Self {
        Self { cipher, index: 0 }
    }

    /// `compound` (first packet's sender SSRC at bytes 4..8) as SRTCP: the
    /// first 8 bytes clear, the rest encrypted, the tag, then the E flag and
    /// the index. `None` once 2^31 packets were sealed.
    pub(crate) fn seal(&mut self, compound: &[u8]) -> Option<Vec<u8>> {
        if compound.len() < 8 || self.index > 0x7fff_ffff {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let ssrc = u32::from_be_bytes([compound[4], compound[5], compound[6], compound[7]]);
        let trailer = (index | 0x8000_0000).to_be_bytes();
        let iv = self.cipher.iv(ssrc, index.into());
        let mut aad = [0u8; 12];
        aad[..8].copy_from_slice(&compound[..8]);
        aad[8..].copy_from_slice(&trailer);
        let mut packet = vec![0u8; compound.len() + TAG_LEN + trailer.len()];
        packet[..8].copy_from_slice(&compound[..8]);
        let body = compound.len() - 8 + TAG_LEN;
        self.cipher
            .encrypt(&iv, &aad, &compound[8..], &mut packet[8..8 + body])
            .ok()?;
        packet[8 + body..].copy_from_slice(&trailer);
        Some(packet)
    }
}

/// A session's SRTP done by the SFU: forwarded media sealed, publishers'
/// audio opened (see [`crate::ingress`]). Its keys, our ciphers once they
/// are known, and where its media goes.
pub(crate) struct Sealer {
    keys: KeySlot,
    path: Path,
    /// Where str0m last sent media or DTLS: (our address, the peer's), the
    /// nominated ICE pair.
    route: Option<(SocketAddr, SocketAddr)>,
    /// Video is ours to seal too (the session estimates no bandwidth).
    video: bool,
    /// The last SRTCP packet opened.
    opened: Vec<u8>,
}

/// What a forwarded packet's RTP header is built from, as rewritten for a
/// subscriber (with its stream's SSRC and extension ids).
#[derive(Clone, Copy)]
pub(crate) struct Head {
    pub(crate) pt: u8,
    pub(crate) marker: bool,
    /// Extended sequence number: ROC << 16 | SEQ, the packet's SRTP index.
    pub(crate) seq: u64,
    pub(crate) timestamp: u32,
    /// RFC 6464 level (negative dBov) and voice activity.
    pub(crate) level: Option<(i8, bool)>,
    /// The video orientation extension's byte (3GPP TS 26.114 §7.4.5).
    pub(crate) orientation: Option<u8>,
}

/// One forwarded packet, as rewritten for a subscriber.
pub(crate) struct Forwarded<'a> {
    pub(crate) head: Head,
    /// The publisher's payload, shared by all its subscribers (and their histories).
    pub(crate) payload: &'a Arc<[u8]>,
}

impl Sealer {
    /// `video`: video is sealed here too (see the module docs).
    pub(crate) fn new(keys: KeySlot, video: bool) -> Self {
        Self {
            keys,
            path: Path::Pending,
            route: None,
            video,
            opened: Vec::new(),
        }
    }

    /// Whether forwarded video may be sealed here (or only audio).
    pub(crate) fn seals_video(&self) -> bool {
        self.video
    }

    /// str0m sent a datagram: media and DTLS (first byte above 3) go to the
    /// nominated pair; STUN answers whoever checks.
    /// A second handshake's keys (str0m took them, ours are stale) are
    /// noticed here: str0m sends a DTLS record as it finishes a handshake,
    /// before any SRTP under the new keys can arrive. (Not per packet: the
    /// flag's cache line is one more miss on the hot path.)
    pub(crate) fn saw_transmit(&mut self, transmit: &Transmit) {
        if transmit.contents.first().is_some_and(|b| *b > 3) {
            self.route = Some((transmit.source, transmit.destination));
        }
        if self.keys.0.rekeyed.load(Ordering::Relaxed) {
            self.path = Path::Str0m;
        }
    }

    /// Whether we know where the peer's media goes (see [`Sealer::saw_transmit`]).
    pub(crate) fn has_route(&self) -> bool {
        self.route.is_some()
    }

    /// The nominated pair may change (ICE state changed, a new peer address
    /// checked in): media goes through str0m until it sends media again.
    pub(crate) fn forget_route(&mut self) {
        self.route = None;
    }

    /// The packet sealed for `stream`, or `None` when it goes through str0m:
    /// keys or route not known yet, a profile left to str0m, or the stream's
    /// once-a-second packet for str0m's sender reports (not remembered here:
    /// str0m's header differs from ours; str0m resends it where RTX is
    /// negotiated). A video stream remembers the rest for NACKs.
    /// (`spare`: buffers of sent datagrams, one taken for this one.)
    pub(crate) fn seal(
        &mut self,
        now: Instant,
        stream: &mut DirectStream,
        packet: Forwarded<'_>,
        spare: &mut Vec<Vec<u8>>,
    ) -> Option<Transmit> {
        self.route?;
        self.path.ciphers(&self.keys)?;
        if now >= stream.str0m_due {
            stream.str0m_due = now + STR0M_EVERY;
            return None;
        }
        let transmit = self.seal_now(stream, &packet, spare.pop().unwrap_or_default())?;
        if let Some(history) = &mut stream.history {
            history.remember(Sent::new(packet.head, packet.payload.clone()));
        }
        Some(transmit)
    }

    fn seal_now(&mut self, stream: &DirectStream, packet: &Forwarded<'_>, buffer: Vec<u8>) -> Option<Transmit> {
        let (source, destination) = self.route?;
        let ciphers = self.path.ciphers(&self.keys)?;
        let mut datagram = stream.header(packet, buffer);
        ciphers
            .sender
            .seal(&mut datagram, &packet.payload[..], stream.ssrc, packet.head.seq)
            .ok()?;
        Some(Transmit {
            proto: Protocol::Udp,
            source,
            destination,
            contents: datagram.into(),
        })
    }

    /// The plain compound RTCP in an SRTCP datagram from the peer, if it is
    /// authentic and we hold the keys (str0m is given the datagram as well).
    pub(crate) fn open_rtcp(&mut self, datagram: &[u8]) -> Option<&[u8]> {
        let ciphers = self.path.ciphers(&self.keys)?;
        ciphers
            .rtcp_opener
            .open(datagram, &mut self.opened)
            .then_some(self.opened.as_slice())
    }

    /// Whether we hold keys of ours to open the peer's SRTP with.
    pub(crate) fn opens(&mut self) -> bool {
        self.path.ciphers(&self.keys).is_some()
    }

    /// Decrypts the peer's SRTP `packet` (see [`Cipher::open`]) into `out`:
    /// `None` while we hold no keys of ours (then str0m opens it).
    pub(crate) fn open_rtp(
        &mut self,
        packet: &[u8],
        header_len: usize,
        ssrc: u32,
        index: u64,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let ciphers = self.path.ciphers(&self.keys)?;
        Some(ciphers.opener.open(packet, header_len, ssrc, index, out))
    }

    /// Our own RTCP `compound`, sealed for the peer's nominated address.
    pub(crate) fn seal_rtcp(&mut self, compound: &[u8]) -> Option<Transmit> {
        let (source, destination) = self.route?;
        let contents = self.path.ciphers(&self.keys)?.rtcp_sealer.seal(compound)?;
        Some(Transmit {
            proto: Protocol::Udp,
            source,
            destination,
            contents: contents.into(),
        })
    }

    /// The packets of `stream` a NACK asks for (see [`nack`]), sealed again
    /// under their sequence numbers: what is remembered and not just resent.
    pub(crate) fn resend(
        &mut self,
        now: Instant,
        stream: &mut DirectStream,
        seq: u16,
        spare: &mut Vec<Vec<u8>>,
    ) -> Option<Transmit> {
        let sent = stream.history.as_mut()?.resend(now, seq)?;
        let (head, payload) = (sent.head, sent.payload.clone());
        self.seal_now(
            stream,
            &Forwarded {
                head,
                payload: &payload,
            },
            spare.pop().unwrap_or_default(),
        )
    }
}

/// How a session's forwarded media leaves when the SFU seals it itself.
enum Path {
    /// The DTLS handshake has not exported keys yet.
    Pending,
    /// We seal and open with these.
    Ours(Ciphers),
    /// The profile is one we leave to str0m.
    Str0m,
}

impl Path {
    /// Our ciphers, once the keys are there and the profile is ours.
    fn ciphers(&mut self, keys: &KeySlot) -> Option<&mut Ciphers> {
        if let Path::Pending = self
            && keys.0.keys.get().is_some()
        {
            *self = keys.ciphers().map_or(Path::Str0m, Path::Ours);
        }
        match self {
            Path::Ours(ciphers) => Some(ciphers),
            _ => None,
        }
    }
}

/// One outgoing stream (a subscription's m-line) sealed by us: its SSRC,
/// the header extensions its m-line negotiated (one-byte form, RFC 8285)
/// and, for video, what went out (for NACKs).
pub(crate) struct DirectStream {
    ssrc: u32,
    /// `urn:ietf:params:rtp-hdrext:sdes:mid` (RFC 8843 §15): id and value.
    mid: Option<(u8, Mid)>,
    /// `urn:ietf:params:rtp-hdrext:ssrc-audio-level` (RFC 6464): id.
    audio_level: Option<u8>,
    /// `urn:3gpp:video-orientation`: id.
    orientation: Option<u8>,
    /// When the next packet goes through str0m instead, so that its sender
    /// reports map RTP time to wall-clock time.
    str0m_due: Instant,
    /// Video: the packets we sealed, for NACKs.
    history: Option<History>,
}

/// How often a directly sealed stream's packet goes through str0m.
const STR0M_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl DirectStream {
    pub(crate) fn new(ssrc: u32, mid: Mid, extensions: &ExtensionMap, now: Instant, video: bool) -> Self {
        let one_byte = |extension| extensions.id_of(extension).filter(|id| (1..=14).contains(id));
        Self {
            ssrc,
            mid: one_byte(Extension::RtpMid)
                .filter(|_| !mid.is_empty())
                .map(|id| (id, mid)),
            audio_level: one_byte(Extension::AudioLevel),
            orientation: one_byte(Extension::VideoOrientation),
            str0m_due: now,
            history: video.then(History::new),
        }
    }

    pub(crate) fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Whether it keeps what it sends for NACKs (video).
    pub(crate) fn remembers(&self) -> bool {
        self.history.is_some()
    }

    /// The RTP header (RFC 3550 §5.1) of a packet, in a buffer with room for
    /// the payload and tag.
    /// The RTP header for `forwarded` in `packet` (emptied first), with room
    /// for the payload and tag.
    fn header(&self, forwarded: &Forwarded<'_>, mut packet: Vec<u8>) -> Vec<u8> {
        packet.clear();
        packet.reserve(12 + 4 + 20 + forwarded.payload.len() + TAG_LEN);
        let head = &forwarded.head;
        let level = self.audio_level.zip(head.level);
        let orientation = self.orientation.zip(head.orientation);
        let extended = self.mid.is_some() || level.is_some() || orientation.is_some();
        packet.push(0x80 | if extended { 0x10 } else { 0 });
        packet.push((head.pt & 0x7f) | if head.marker { 0x80 } else { 0 });
        packet.extend_from_slice(&(head.seq as u16).to_be_bytes());
        packet.extend_from_slice(&head.timestamp.to_be_bytes());
        packet.extend_from_slice(&self.ssrc.to_be_bytes());
        if extended {
            packet.extend_from_slice(&[0xbe, 0xde, 0, 0]);
            let start = packet.len();
            if let Some((id, mid)) = &self.mid {
                let value = mid.as_bytes();
                packet.push((id << 4) | (value.len() as u8 - 1));
                packet.extend_from_slice(value);
            }
            if let Some((id, (level, voice))) = level {
                packet.push(id << 4);
                packet.push(if voice { 0x80 } else { 0 } | (level.unsigned_abs() & 0x7f));
            }
            if let Some((id, orientation)) = orientation {
                packet.push(id << 4);
                packet.push(orientation);
            }
            while !(packet.len() - start).is_multiple_of(4) {
                packet.push(0);
            }
            let words = ((packet.len() - start) / 4) as u16;
            packet[start - 2..start].copy_from_slice(&words.to_be_bytes());
        }
        packet
    }
}

// ---- catching the keys --------------------------------------------------------

thread_local! {
    /// The slot the next DTLS instance made on this thread reports its keys to
    /// (set by `build_rtc` around str0m's `RtcConfig::build`).
    static NEXT_SLOT: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// Builds a session's `Rtc` with the key-catching DTLS provider; the slot is
/// filled when its handshake exports the SRTP keys.
pub(crate) fn build_rtc(config: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
    let slot = KeySlot::default();
    NEXT_SLOT.with(|next| *next.borrow_mut() = Some(slot.clone()));
    let rtc = config.set_crypto_provider(Arc::new(provider().clone())).build(now);
    NEXT_SLOT.with(|next| next.borrow_mut().take());
    (rtc, slot)
}

/// str0m's own provider with its DTLS wrapped.
fn provider() -> &'static CryptoProvider {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    static TAP: OnceLock<KeyTap> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let mut provider = str0m::crypto::from_feature_flags();
        let inner = provider.dtls_provider;
        provider.dtls_provider = TAP.get_or_init(|| KeyTap(inner));
        provider
    })
}

#[derive(Debug)]
struct KeyTap(&'static dyn DtlsProvider);

impl DtlsProvider for KeyTap {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.0.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = self.0.new_dtls(cert, now, version, mtu)?;
        let slot = NEXT_SLOT.with(|next| next.borrow().clone());
        Ok(Box::new(TappedDtls { inner, slot }))
    }
}

#[derive(Debug)]
struct TappedDtls {
    inner: Box<dyn DtlsInstance>,
    slot: Option<KeySlot>,
}

impl DtlsInstance for TappedDtls {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let output = self.inner.poll_output(buf);
        if let (DtlsOutput::KeyingMaterial(material, profile), Some(slot)) = (&output, &self.slot) {
            let keying = Keying {
                material: material.as_ref().to_vec(),
                profile: *profile,
                client: self.inner.is_active(),
            };
            // str0m takes a second handshake's keys: ours would be stale.
            if slot.0.keys.set(keying).is_err() {
                slot.0.rekeyed.store(true, Ordering::Relaxed);
            }
        }
        output
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    #[test]
    fn key_derivation_matches_rfc_3711_b3() {
        let srtp = provider().srtp_provider;
        let master = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let key: [u8; 16] = derive(srtp, &master, &salt, LABEL_RTP_KEY);
        assert_eq!(key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let session_salt: [u8; 14] = derive(srtp, &master, &salt, LABEL_RTP_SALT);
        assert_eq!(session_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        // The authentication key (label 1) is 20 bytes: two counter blocks.
        let auth: [u8; 20] = derive(srtp, &master, &salt, 1);
        assert_eq!(auth.to_vec(), hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    }

    /// RFC 7714 §16's packet (header, then "Gallia est omnis divisa in
    /// partes tres") sealed by `sender`, against the RFC's `expected`.
    /// ... and opened again by `opener` (same key), but not under another index.
    fn seals_the_rfc_7714_packet(mut sender: Cipher, mut opener: Cipher, expected: &str) {
        let mut packet = hex("8040f17b8041f8d35501a0b2");
        let payload = hex("47616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573");
        sender.seal(&mut packet, &payload, 0x5501a0b2, 0xf17b).expect("sealed");
        assert_eq!(packet, hex(expected));
        let mut plain = Vec::new();
        assert!(opener.open(&packet, 12, 0x5501a0b2, 0xf17b, &mut plain));
        assert_eq!(plain, payload);
        assert!(
            !opener.open(&packet, 12, 0x5501a0b2, 0x1_f17b, &mut plain),
            "another ROC"
        );
        let mut forged = packet.clone();
        forged[3] ^= 1;
        assert!(
            !opener.open(&forged, 12, 0x5501a0b2, 0xf17b, &mut plain),
            "header changed"
        );
        assert!(
            !opener.open(&packet[..20], 12, 0x5501a0b2, 0xf17b, &mut plain),
            "truncated"
        );
    }

    fn gcm(key: &str, encrypt: bool) -> Cipher {
        let srtp = provider().srtp_provider;
        let key = hex(key);
        let aead = match key.len() {
            16 => Aead::Aes128(
                srtp.aead_aes_128_gcm()
                    .create_cipher(key.try_into().expect("16"), encrypt),
            ),
            _ => Aead::Aes256(
                srtp.aead_aes_256_gcm()
                    .create_cipher(key.try_into().expect("32"), encrypt),
            ),
        };
        let salt = hex(RFC_7714_SALT).try_into().expect("12 bytes");
        Cipher { aead, salt }
    }

    const RFC_7714_SALT: &str = "517569642070726f2071756f";

    #[test]
    fn sealing_matches_rfc_7714_16_1() {
        let key = "000102030405060708090a0b0c0d0e0f";
        seals_the_rfc_7714_packet(
            gcm(key, true),
            gcm(key, false),
            "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f42a5f47a51c7d19b36de3adf8833899d7f27beb16a9152cf765ee4390cce",
        );
    }

    #[test]
    fn sealing_matches_rfc_7714_16_2() {
        let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        seals_the_rfc_7714_packet(
            gcm(key, true),
            gcm(key, false),
            "8040f17b8041f8d35501a0b232b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3b50b2a0276ffae0f1ba63799b87b7aa3db36dfffd6b0f9bb7878d7a76c13",
        );
    }

    fn forwarded(seq: u64, payload: &Arc<[u8]>) -> Forwarded<'_> {
        Forwarded {
            head: Head {
                pt: 111,
                marker: false,
                seq,
                timestamp: 960 * seq as u32,
                level: Some((-30, true)),
                orientation: None,
            },
            payload,
        }
    }

    fn transmit(first_byte: u8, destination: SocketAddr) -> Transmit {
        Transmit {
            proto: Protocol::Udp,
            source: "127.0.0.1:3478".parse().expect("address"),
            destination,
            contents: vec![first_byte, 0, 0, 0].into(),
        }
    }

    #[test]
    fn the_sealer_waits_for_route_and_keys_and_leaves_str0m_a_packet_a_second() {
        let now = Instant::now();
        let keys = KeySlot::default();
        let mut sealer = Sealer::new(keys.clone(), false);
        let mut stream = DirectStream::new(0x1234_5678, Mid::from("1"), &ExtensionMap::standard(), now, false);
        let payload = Arc::from(vec![0xfc, 1, 2, 3, 4]);
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("address");
        assert!(
            sealer
                .seal(now, &mut stream, forwarded(1, &payload), &mut Vec::new())
                .is_none(),
            "no route yet"
        );
        // STUN answers whoever checks: not the route. DTLS (22) goes to the nominated pair.
        sealer.saw_transmit(&transmit(1, "127.0.0.1:1".parse().expect("address")));
        assert!(
            sealer
                .seal(now, &mut stream, forwarded(1, &payload), &mut Vec::new())
                .is_none(),
            "no route yet"
        );
        sealer.saw_transmit(&transmit(22, peer));
        assert!(
            sealer
                .seal(now, &mut stream, forwarded(1, &payload), &mut Vec::new())
                .is_none(),
            "no keys yet"
        );
        let material: Vec<u8> = (0..2 * 16 + 2 * 12).map(|i: u8| i.wrapping_mul(7)).collect();
        let keying = Keying {
            material,
            profile: SrtpProfile::AEAD_AES_128_GCM,
            client: false,
        };
        let (master, master_salt) = keying.half::<16>(false).expect("128-bit material");
        assert!(keys.0.keys.set(keying).is_ok());
        assert!(
            sealer
                .seal(now, &mut stream, forwarded(1, &payload), &mut Vec::new())
                .is_none(),
            "the first is str0m's"
        );
        let at = now + std::time::Duration::from_millis(20);
        // In a buffer of an earlier datagram (what is left in it must not show).
        let mut spare = vec![vec![0xee; 1_500]];
        let sealed = sealer
            .seal(at, &mut stream, forwarded(2, &payload), &mut spare)
            .expect("sealed");
        assert!(spare.is_empty(), "the spare buffer was taken");
        assert_eq!(sealed.destination, peer);
        assert_eq!(sealed.contents.len(), 12 + 8 + payload.len() + TAG_LEN);
        // Header: V=2 with extensions, PT 111, seq 2, timestamp, SSRC, then the
        // one-byte extensions: mid "1" (id 4 in str0m's standard map) and the
        // audio level (id 1): voice, 30 dB below overload.
        let bytes: &[u8] = &sealed.contents;
        assert_eq!(
            &bytes[..12],
            &[0x90, 111, 0, 2, 0, 0, 0x07, 0x80, 0x12, 0x34, 0x56, 0x78]
        );
        assert_eq!(&bytes[12..16], &[0xbe, 0xde, 0, 1]);
        let mut ext = bytes[16..20].to_vec();
        ext.sort_unstable();
        assert_eq!(ext, {
            let mut want = vec![4 << 4, b'1', 1 << 4, 0x80 | 30];
            want.sort_unstable();
            want
        });
        // The payload decrypts with the session key derived from our half.
        let srtp = provider().srtp_provider;
        let key: [u8; 16] = derive(srtp, &master, &master_salt, LABEL_RTP_KEY);
        let salt: [u8; 12] = derive(srtp, &master, &master_salt, LABEL_RTP_SALT);
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        iv[10..12].copy_from_slice(&2u16.to_be_bytes());
        for (byte, salt) in iv.iter_mut().zip(salt) {
            *byte ^= salt;
        }
        let mut plain = vec![0u8; payload.len() + TAG_LEN];
        let n = srtp
            .aead_aes_128_gcm()
            .create_cipher(key, false)
            .decrypt(&iv, &[&bytes[..20]], &bytes[20..], &mut plain)
            .expect("authentic");
        assert_eq!(&plain[..n], &payload[..]);
        assert!(
            sealer
                .seal(at, &mut stream, forwarded(3, &payload), &mut Vec::new())
                .is_some()
        );
        let second = now + STR0M_EVERY;
        assert!(
            sealer
                .seal(second, &mut stream, forwarded(52, &payload), &mut Vec::new())
                .is_none(),
            "str0m's again"
        );
        assert!(
            sealer
                .seal(second, &mut stream, forwarded(53, &payload), &mut Vec::new())
                .is_some()
        );
    }

    /// An SRTCP packet (RFC 7714 §9) of `compound` under `key`/`salt`, index `index`.
    fn srtcp(key: [u8; 16], salt: [u8; 12], compound: &[u8], index: u32) -> Vec<u8> {
        let trailer = (index | 0x8000_0000).to_be_bytes();
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&compound[4..8]);
        iv[8..12].copy_from_slice(&index.to_be_bytes());
        for (byte, salt) in iv.iter_mut().zip(salt) {
            *byte ^= salt;
        }
        let aad = [&compound[..8], &trailer[..]].concat();
        let mut sealed = vec![0u8; compound.len() - 8 + TAG_LEN];
        provider()
            .srtp_provider
            .aead_aes_128_gcm()
            .create_cipher(key, true)
            .encrypt(&iv, &aad, &compound[8..], &mut sealed)
            .expect("sealed");
        [&compound[..8], &sealed[..], &trailer[..]].concat()
    }

    #[test]
    fn srtcp_opens_once_per_index_and_only_if_authentic() {
        let (key, salt) = ([7u8; 16], [9u8; 12]);
        let aead = Aead::Aes128(provider().srtp_provider.aead_aes_128_gcm().create_cipher(key, false));
        let mut opener = SrtcpOpener::new(Cipher { aead, salt });
        // A receiver report, then a NACK.
        let compound = [
            0x80, 201, 0, 1, 0, 0, 0, 9, 0x81, 205, 0, 3, 0, 0, 0, 9, 0, 0, 0, 7, 0, 5, 0, 0,
        ];
        let mut out = Vec::new();
        let first = srtcp(key, salt, &compound, 5);
        assert!(opener.open(&first, &mut out));
        assert_eq!(out, compound);
        assert!(!opener.open(&first, &mut out), "a replay");
        assert!(opener.open(&srtcp(key, salt, &compound, 100), &mut out));
        assert!(opener.open(&srtcp(key, salt, &compound, 99), &mut out), "late but new");
        assert!(!opener.open(&srtcp(key, salt, &compound, 99), &mut out), "a replay");
        assert!(!opener.open(&srtcp(key, salt, &compound, 5), &mut out), "too old");
        let mut forged = srtcp(key, salt, &compound, 101);
        forged[10] ^= 1;
        assert!(!opener.open(&forged, &mut out), "not authentic");
        assert!(
            opener.open(&srtcp(key, salt, &compound, 101), &mut out),
            "a forgery does not burn the index"
        );
        assert!(!opener.open(&[0x80, 201, 0, 1], &mut out), "too short");
        // Another SSRC numbers its own SRTCP.
        let mut other = compound;
        other[7] = 10;
        assert!(
            opener.open(&srtcp(key, salt, &other, 1), &mut out),
            "its own first index"
        );
        assert!(!opener.open(&srtcp(key, salt, &other, 1), &mut out), "a replay");
        // Our sealer's packets are what the reference above makes, numbered from 0.
        let aead = Aead::Aes128(provider().srtp_provider.aead_aes_128_gcm().create_cipher(key, true));
        let mut sealer = SrtcpSealer::new(Cipher { aead, salt });
        assert_eq!(sealer.seal(&compound), Some(srtcp(key, salt, &compound, 0)));
        assert_eq!(sealer.seal(&compound), Some(srtcp(key, salt, &compound, 1)));
        assert_eq!(sealer.seal(&compound[..4]), None, "no sender SSRC");
    }

    #[test]
    fn a_profile_without_aead_stays_with_str0m() {
        let now = Instant::now();
        let keys = KeySlot::default();
        let mut sealer = Sealer::new(keys.clone(), false);
        let mut stream = DirectStream::new(1, Mid::from("0"), &ExtensionMap::standard(), now, false);
        sealer.saw_transmit(&transmit(128, "127.0.0.1:50000".parse().expect("address")));
        let keying = Keying {
            material: vec![1; 2 * 16 + 2 * 14],
            profile: SrtpProfile::AES128_CM_SHA1_80,
            client: true,
        };
        assert!(keys.0.keys.set(keying).is_ok());
        for seq in 1..5 {
            let at = now + std::time::Duration::from_millis(20 * seq);
            assert!(
                sealer
                    .seal(
                        at,
                        &mut stream,
                        forwarded(seq, &Arc::from(vec![1, 2, 3])),
                        &mut Vec::new()
                    )
                    .is_none()
            );
        }
        assert!(matches!(sealer.path, Path::Str0m));
    }

    #[test]
    fn our_half_of_the_material_follows_the_dtls_role() {
        let material: Vec<u8> = (0..2 * 16 + 2 * 12).collect();
        let client = Keying {
            material: material.clone(),
            profile: SrtpProfile::AEAD_AES_128_GCM,
            client: true,
        };
        let (key, salt) = client.half::<16>(client.client).expect("128-bit material");
        assert_eq!((key[0], salt[0]), (0, 32));
        let server = Keying {
            client: false,
            ..client
        };
        let (key, salt) = server.half::<16>(server.client).expect("128-bit material");
        assert_eq!((key[0], salt[0]), (16, 44));
        assert!(server.half::<32>(false).is_none(), "wrong length is refused");
    }
}
