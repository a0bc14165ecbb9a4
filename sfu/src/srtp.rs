//! Our own SRTP sender for forwarded audio: the hot path's short cut past str0m.
//!
//! str0m sends a written RTP packet on the session's next timeout, which runs
//! its ICE, DTLS, RTCP and pacer bookkeeping before it packetizes and
//! encrypts: most of the SFU's CPU in an audio fan-out. A forwarded audio
//! packet needs none of that (the forwarder has rewritten its numbers, audio
//! is neither paced nor retransmitted), so the SFU builds the header, seals it
//! with the session's SRTP key and hands the datagram to the driver itself.
//!
//! - **Keys.** [`build_rtc`] gives str0m a DTLS provider that wraps its own and
//!   copies the keying material the handshake exports (RFC 5764 §4.2) into the
//!   session's [`KeySlot`]; [`SrtpSender`] derives the session key and salt
//!   from it (RFC 3711 §4.3, AES-CM PRF).
//! - **Sealing.** AEAD_AES_128_GCM and AEAD_AES_256_GCM (RFC 7714 §8: the IV is
//!   the salt XOR SSRC, ROC and sequence number; the header is the associated
//!   data). A session that negotiated AES_CM_128_HMAC_SHA1_80 keeps str0m's path.
//! - **One sender per SSRC.** str0m keeps sending that SSRC's sender reports,
//!   and it only learns the stream's RTP time from packets written through it,
//!   so the SFU writes one packet a second of each such stream through str0m
//!   (`Sfu::forward`). Both paths number packets from the same forwarder, so
//!   an SRTP index is never used twice.

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
    /// are stale and the session's audio goes back to str0m.
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
    /// Our sending half of the session's SRTP keys, if the handshake is done
    /// and the profile is one we seal ourselves.
    pub(crate) fn sender(&self) -> Option<SrtpSender> {
        let keying = self.0.keys.get()?;
        let srtp = provider().srtp_provider;
        match keying.profile {
            SrtpProfile::AEAD_AES_128_GCM => {
                let (master, salt) = keying.ours::<16>()?;
                let key: [u8; 16] = derive(srtp, &master, &salt, LABEL_RTP_KEY);
                let salt = derive(srtp, &master, &salt, LABEL_RTP_SALT);
                Some(SrtpSender::aes_128_gcm(srtp, key, salt))
            }
            SrtpProfile::AEAD_AES_256_GCM => {
                let (master, salt) = keying.ours::<32>()?;
                let key: [u8; 32] = derive(srtp, &master, &salt, LABEL_RTP_KEY);
                let salt = derive(srtp, &master, &salt, LABEL_RTP_SALT);
                Some(SrtpSender::aes_256_gcm(srtp, key, salt))
            }
            _ => None,
        }
    }
}

impl Keying {
    /// Our master key and salt (the AEAD profiles' salts are 12 bytes).
    fn ours<const KEY: usize>(&self) -> Option<([u8; KEY], [u8; 12])> {
        let m = &self.material;
        if m.len() != 2 * KEY + 2 * 12 {
            return None;
        }
        let (key_at, salt_at) = if self.client { (0, 2 * KEY) } else { (KEY, 2 * KEY + 12) };
        Some((
            m[key_at..key_at + KEY].try_into().ok()?,
            m[salt_at..salt_at + 12].try_into().ok()?,
        ))
    }
}

const LABEL_RTP_KEY: u8 = 0;
const LABEL_RTP_SALT: u8 = 2;

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

/// Seals RTP packets of one session with its SRTP key (our direction).
pub(crate) struct SrtpSender {
    cipher: Aead,
    salt: [u8; 12],
}

enum Aead {
    Aes128(Box<dyn AeadAes128GcmCipher>),
    Aes256(Box<dyn AeadAes256GcmCipher>),
}

/// The AEAD tag appended to each packet (RFC 7714 §7).
pub(crate) const TAG_LEN: usize = 16;

impl SrtpSender {
    fn aes_128_gcm(srtp: &dyn SrtpProvider, key: [u8; 16], salt: [u8; 12]) -> Self {
        let cipher = Aead::Aes128(srtp.aead_aes_128_gcm().create_cipher(key, true));
        Self { cipher, salt }
    }

    fn aes_256_gcm(srtp: &dyn SrtpProvider, key: [u8; 32], salt: [u8; 12]) -> Self {
        let cipher = Aead::Aes256(srtp.aead_aes_256_gcm().create_cipher(key, true));
        Self { cipher, salt }
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
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[6..12].copy_from_slice(&index.to_be_bytes()[2..]);
        for (byte, salt) in iv.iter_mut().zip(self.salt) {
            *byte ^= salt;
        }
        let header_len = packet.len();
        packet.resize(header_len + payload.len() + TAG_LEN, 0);
        let (header, body) = packet.split_at_mut(header_len);
        match &mut self.cipher {
            Aead::Aes128(cipher) => cipher.encrypt(&iv, header, payload, body),
            Aead::Aes256(cipher) => cipher.encrypt(&iv, header, payload, body),
        }
    }
}

/// A session's sealing of forwarded audio: its keys, our sender once they
/// are known, and where its media goes.
pub(crate) struct Sealer {
    keys: KeySlot,
    path: AudioPath,
    /// Where str0m last sent media or DTLS: (our address, the peer's), the
    /// nominated ICE pair.
    route: Option<(SocketAddr, SocketAddr)>,
}

/// One forwarded packet, as rewritten for a subscriber.
pub(crate) struct Forwarded<'a> {
    pub(crate) pt: u8,
    pub(crate) marker: bool,
    /// Extended sequence number: ROC << 16 | SEQ, the packet's SRTP index.
    pub(crate) seq: u64,
    pub(crate) timestamp: u32,
    /// RFC 6464 level (negative dBov) and voice activity.
    pub(crate) level: Option<(i8, bool)>,
    pub(crate) payload: &'a [u8],
}

impl Sealer {
    pub(crate) fn new(keys: KeySlot) -> Self {
        Self {
            keys,
            path: AudioPath::Pending,
            route: None,
        }
    }

    /// str0m sent a datagram: media and DTLS (first byte above 3) go to the
    /// nominated pair; STUN answers whoever checks.
    pub(crate) fn saw_transmit(&mut self, transmit: &Transmit) {
        if transmit.contents.first().is_some_and(|b| *b > 3) {
            self.route = Some((transmit.source, transmit.destination));
        }
    }

    /// The nominated pair may change (ICE state changed, a new peer address
    /// checked in): audio goes through str0m until it sends media again.
    pub(crate) fn forget_route(&mut self) {
        self.route = None;
    }

    /// The packet sealed for `stream`, or `None` when it goes through str0m:
    /// keys or route not known yet, a profile left to str0m, or the stream's
    /// once-a-second packet for str0m's sender reports.
    pub(crate) fn seal(&mut self, now: Instant, stream: &mut DirectStream, packet: Forwarded<'_>) -> Option<Transmit> {
        let (source, destination) = self.route?;
        let sender = self.path.sender(&self.keys)?;
        if now >= stream.str0m_due {
            stream.str0m_due = now + STR0M_EVERY;
            return None;
        }
        let mut datagram = stream.header(&packet);
        sender
            .seal(&mut datagram, packet.payload, stream.ssrc, packet.seq)
            .ok()?;
        Some(Transmit {
            proto: Protocol::Udp,
            source,
            destination,
            contents: datagram.into(),
        })
    }
}

/// How a session's forwarded audio leaves when the SFU seals it itself.
enum AudioPath {
    /// The DTLS handshake has not exported keys yet.
    Pending,
    /// We seal with this sender.
    Ours(SrtpSender),
    /// The profile is one we leave to str0m.
    Str0m,
}

impl AudioPath {
    /// Our sender, once the keys are there and the profile is ours.
    fn sender(&mut self, keys: &KeySlot) -> Option<&mut SrtpSender> {
        if keys.0.rekeyed.load(Ordering::Relaxed) {
            *self = AudioPath::Str0m;
        }
        if let AudioPath::Pending = self
            && keys.0.keys.get().is_some()
        {
            *self = keys.sender().map_or(AudioPath::Str0m, AudioPath::Ours);
        }
        match self {
            AudioPath::Ours(sender) => Some(sender),
            _ => None,
        }
    }
}

/// One outgoing audio stream (a subscription's m-line) sealed by us: its SSRC
/// and the header extensions its m-line negotiated (one-byte form, RFC 8285).
pub(crate) struct DirectStream {
    ssrc: u32,
    /// `urn:ietf:params:rtp-hdrext:sdes:mid` (RFC 8843 §15): id and value.
    mid: Option<(u8, Mid)>,
    /// `urn:ietf:params:rtp-hdrext:ssrc-audio-level` (RFC 6464): id.
    audio_level: Option<u8>,
    /// When the next packet goes through str0m instead, so that its sender
    /// reports map RTP time to wall-clock time.
    str0m_due: Instant,
}

/// How often a directly sealed stream's packet goes through str0m.
const STR0M_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl DirectStream {
    pub(crate) fn new(ssrc: u32, mid: Mid, extensions: &ExtensionMap, now: Instant) -> Self {
        let mid = extensions
            .id_of(Extension::RtpMid)
            .filter(|id| (1..=14).contains(id) && !mid.is_empty())
            .map(|id| (id, mid));
        let audio_level = extensions
            .id_of(Extension::AudioLevel)
            .filter(|id| (1..=14).contains(id));
        Self {
            ssrc,
            mid,
            audio_level,
            str0m_due: now,
        }
    }

    /// The RTP header (RFC 3550 §5.1) of a packet, in a buffer with room for
    /// the payload and tag.
    fn header(&self, forwarded: &Forwarded<'_>) -> Vec<u8> {
        let mut packet = Vec::with_capacity(12 + 4 + 20 + forwarded.payload.len() + TAG_LEN);
        let level = self.audio_level.zip(forwarded.level);
        let extended = self.mid.is_some() || level.is_some();
        packet.push(0x80 | if extended { 0x10 } else { 0 });
        packet.push((forwarded.pt & 0x7f) | if forwarded.marker { 0x80 } else { 0 });
        packet.extend_from_slice(&(forwarded.seq as u16).to_be_bytes());
        packet.extend_from_slice(&forwarded.timestamp.to_be_bytes());
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
    fn seals_the_rfc_7714_packet(mut sender: SrtpSender, expected: &str) {
        let mut packet = hex("8040f17b8041f8d35501a0b2");
        let payload = hex("47616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573");
        sender.seal(&mut packet, &payload, 0x5501a0b2, 0xf17b).expect("sealed");
        assert_eq!(packet, hex(expected));
    }

    const RFC_7714_SALT: &str = "517569642070726f2071756f";

    #[test]
    fn sealing_matches_rfc_7714_16_1() {
        let key = hex("000102030405060708090a0b0c0d0e0f").try_into().expect("16 bytes");
        let salt = hex(RFC_7714_SALT).try_into().expect("12 bytes");
        let sender = SrtpSender::aes_128_gcm(provider().srtp_provider, key, salt);
        seals_the_rfc_7714_packet(
            sender,
            "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f42a5f47a51c7d19b36de3adf8833899d7f27beb16a9152cf765ee4390cce",
        );
    }

    #[test]
    fn sealing_matches_rfc_7714_16_2() {
        let key = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .try_into()
            .expect("32 bytes");
        let salt = hex(RFC_7714_SALT).try_into().expect("12 bytes");
        let sender = SrtpSender::aes_256_gcm(provider().srtp_provider, key, salt);
        seals_the_rfc_7714_packet(
            sender,
            "8040f17b8041f8d35501a0b232b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3b50b2a0276ffae0f1ba63799b87b7aa3db36dfffd6b0f9bb7878d7a76c13",
        );
    }

    fn forwarded(seq: u64, payload: &[u8]) -> Forwarded<'_> {
        Forwarded {
            pt: 111,
            marker: false,
            seq,
            timestamp: 960 * seq as u32,
            level: Some((-30, true)),
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
        let mut sealer = Sealer::new(keys.clone());
        let mut stream = DirectStream::new(0x1234_5678, Mid::from("1"), &ExtensionMap::standard(), now);
        let payload = [0xfc, 1, 2, 3, 4];
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("address");
        assert!(
            sealer.seal(now, &mut stream, forwarded(1, &payload)).is_none(),
            "no route yet"
        );
        // STUN answers whoever checks: not the route. DTLS (22) goes to the nominated pair.
        sealer.saw_transmit(&transmit(1, "127.0.0.1:1".parse().expect("address")));
        assert!(
            sealer.seal(now, &mut stream, forwarded(1, &payload)).is_none(),
            "no route yet"
        );
        sealer.saw_transmit(&transmit(22, peer));
        assert!(
            sealer.seal(now, &mut stream, forwarded(1, &payload)).is_none(),
            "no keys yet"
        );
        let material: Vec<u8> = (0..2 * 16 + 2 * 12).map(|i: u8| i.wrapping_mul(7)).collect();
        let keying = Keying {
            material,
            profile: SrtpProfile::AEAD_AES_128_GCM,
            client: false,
        };
        let (master, master_salt) = keying.ours::<16>().expect("128-bit material");
        assert!(keys.0.keys.set(keying).is_ok());
        assert!(
            sealer.seal(now, &mut stream, forwarded(1, &payload)).is_none(),
            "the first is str0m's"
        );
        let at = now + std::time::Duration::from_millis(20);
        let sealed = sealer.seal(at, &mut stream, forwarded(2, &payload)).expect("sealed");
        assert_eq!(sealed.destination, peer);
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
        assert_eq!(&plain[..n], &payload);
        assert!(sealer.seal(at, &mut stream, forwarded(3, &payload)).is_some());
        let second = now + STR0M_EVERY;
        assert!(
            sealer.seal(second, &mut stream, forwarded(52, &payload)).is_none(),
            "str0m's again"
        );
        assert!(sealer.seal(second, &mut stream, forwarded(53, &payload)).is_some());
    }

    #[test]
    fn a_profile_without_aead_stays_with_str0m() {
        let now = Instant::now();
        let keys = KeySlot::default();
        let mut sealer = Sealer::new(keys.clone());
        let mut stream = DirectStream::new(1, Mid::from("0"), &ExtensionMap::standard(), now);
        sealer.saw_transmit(&transmit(128, "127.0.0.1:50000".parse().expect("address")));
        let keying = Keying {
            material: vec![1; 2 * 16 + 2 * 14],
            profile: SrtpProfile::AES128_CM_SHA1_80,
            client: true,
        };
        assert!(keys.0.keys.set(keying).is_ok());
        for seq in 1..5 {
            let at = now + std::time::Duration::from_millis(20 * seq);
            assert!(sealer.seal(at, &mut stream, forwarded(seq, &[1, 2, 3])).is_none());
        }
        assert!(matches!(sealer.path, AudioPath::Str0m));
    }

    #[test]
    fn our_half_of_the_material_follows_the_dtls_role() {
        let material: Vec<u8> = (0..2 * 16 + 2 * 12).collect();
        let client = Keying {
            material: material.clone(),
            profile: SrtpProfile::AEAD_AES_128_GCM,
            client: true,
        };
        let (key, salt) = client.ours::<16>().expect("128-bit material");
        assert_eq!((key[0], salt[0]), (0, 32));
        let server = Keying {
            client: false,
            ..client
        };
        let (key, salt) = server.ours::<16>().expect("128-bit material");
        assert_eq!((key[0], salt[0]), (16, 44));
        assert!(server.ours::<32>().is_none(), "wrong length is refused");
    }
}
