// The live stats of one call, read from RTCPeerConnection.getStats()
// (https://www.w3.org/TR/webrtc-stats/): bitrate in and out, packet loss,
// round-trip time and the selected candidate pair.

/**
 * One reading. `previous` is the last reading (for bitrates), or null.
 * Returns {at, bytesIn, bytesOut, bitrateIn, bitrateOut, lossPercent, rttMs,
 *          pair: {localType, remoteType, local, remote, protocol} | null,
 *          bytesByTrack: Map(trackIdentifier → bytesReceived),
 *          audioPacketsByTrack: Map(trackIdentifier → packetsReceived) of audio tracks}.
 */
export async function readStats(pc, previous) {
  const report = await pc.getStats();
  let bytesIn = 0;
  let bytesOut = 0;
  let lost = 0;
  let received = 0;
  const bytesByTrack = new Map();
  const audioPacketsByTrack = new Map();
  let pairId = null;
  const pairs = [];
  report.forEach((s) => {
    if (s.type === "inbound-rtp") {
      bytesIn += s.bytesReceived || 0;
      lost += Math.max(0, s.packetsLost || 0);
      received += s.packetsReceived || 0;
      if (s.trackIdentifier) bytesByTrack.set(s.trackIdentifier, s.bytesReceived || 0);
      if (s.trackIdentifier && s.kind === "audio") audioPacketsByTrack.set(s.trackIdentifier, s.packetsReceived || 0);
    } else if (s.type === "outbound-rtp") {
      bytesOut += s.bytesSent || 0;
    } else if (s.type === "transport" && s.selectedCandidatePairId) {
      pairId = s.selectedCandidatePairId;
    } else if (s.type === "candidate-pair") {
      pairs.push(s);
    }
  });
  const selected = (pairId && report.get(pairId)) || pairs.find((p) => p.nominated && p.state === "succeeded") || null;
  let pair = null;
  let rttMs = null;
  if (selected) {
    const local = report.get(selected.localCandidateId);
    const remote = report.get(selected.remoteCandidateId);
    if (typeof selected.currentRoundTripTime === "number") rttMs = selected.currentRoundTripTime * 1000;
    if (local && remote) {
      pair = {
        localType: local.candidateType,
        remoteType: remote.candidateType,
        local: `${local.address ?? local.ip}:${local.port}`,
        localAddress: local.address ?? local.ip,
        remote: `${remote.address ?? remote.ip}:${remote.port}`,
        remoteAddress: remote.address ?? remote.ip,
        protocol: local.protocol,
      };
    }
  }
  const at = performance.now();
  const seconds = previous ? (at - previous.at) / 1000 : 0;
  const rate = (now, before) => (seconds > 0 ? Math.max(0, ((now - before) * 8) / seconds) : 0);
  return {
    at,
    bytesIn,
    bytesOut,
    bitrateIn: previous ? rate(bytesIn, previous.bytesIn) : 0,
    bitrateOut: previous ? rate(bytesOut, previous.bytesOut) : 0,
    lossPercent: lost + received > 0 ? (100 * lost) / (lost + received) : 0,
    rttMs,
    pair,
    bytesByTrack,
    audioPacketsByTrack,
  };
}

export function formatBitrate(bps) {
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(2)} Mbit/s`;
  return `${Math.round(bps / 1e3)} kbit/s`;
}

export function formatBytes(bytes) {
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(1)} MB`;
  return `${Math.round(bytes / 1e3)} kB`;
}

/** A pair type in words: "host" (direct), "relay" (through TURN), "srflx"/"prflx" (through NAT). */
export function describePair(pair) {
  if (!pair) return "not connected";
  const via = pair.localType === "relay" || pair.remoteType === "relay" ? "relayed through TURN" : "direct";
  return `${pair.localType} ↔ ${pair.remoteType} (${via}, ${pair.protocol || "udp"})`;
}
