// One call over RTCPeerConnection, speaking Matrix call protocol v1 (the
// events Element Web sends): m.call.invite / candidates / answer /
// select_answer / negotiate / sdp_stream_metadata_changed / reject / hangup.
// Spec: https://spec.matrix.org/v1.15/client-server-api/#voice-over-ip
//
// The same class places 1:1 calls, answers them and joins a conference by
// calling the conference bot: the bot is just the other party, whose
// renegotiation offers add one stream per participant, each labelled in
// `sdp_stream_metadata` with the publisher's `user_id`.
//
// Events dispatched: "state" (this.state changed), "streams" (remote streams
// or their metadata changed), "ended" (detail: {reason, message, isError}).

const INVITE_LIFETIME_MS = 60000;
const NEGOTIATE_LIFETIME_MS = 10000;
/** How long to wait for ICE candidates before sending an SDP without them all. */
const GATHER_WAIT_MS = 1000;
/** Candidates found after the SDP went out are sent in batches this often. */
const CANDIDATE_BATCH_MS = 200;
/** Signalled but no media path after this long: ICE failed. */
const CONNECT_TIMEOUT_MS = 30000;

const RELAY_HINT = " With “Relay only” all media must pass the TURN server: check that it is reachable.";

const METADATA_KEYS = ["sdp_stream_metadata", "org.matrix.msc3077.sdp_stream_metadata"];

export const CALL_EVENT_TYPES = new Set([
  "m.call.invite",
  "m.call.candidates",
  "m.call.answer",
  "m.call.select_answer",
  "m.call.negotiate",
  "m.call.reject",
  "m.call.hangup",
  "m.call.sdp_stream_metadata_changed",
  "org.matrix.call.sdp_stream_metadata_changed",
]);

/** A fresh call id (the opaque-id grammar: `[0-9A-Za-z._~-]`). */
export function newCallId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `c${Date.now().toString(36)}.${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export function metadataOf(content) {
  for (const key of METADATA_KEYS) {
    if (content && typeof content[key] === "object" && content[key]) return content[key];
  }
  return null;
}

/** What went wrong with getUserMedia, in words a person can act on. */
export function mediaErrorMessage(e) {
  switch (e?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera and microphone access was denied. Allow it in the browser's site settings (the icon left of the address) and try again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera or microphone was found. Connect one, or place a voice call.";
    case "NotReadableError":
      return "The camera or microphone is in use by another application.";
    case "InsecureContext":
      return "This page is not a secure context (use https or localhost), so the browser offers no camera or microphone.";
    default:
      return `Could not open the camera or microphone: ${e?.message || e}`;
  }
}

/**
 * The streams the remote side sends, from its SDP: per m-section its mid,
 * direction and msid stream id. Only sections it sends on count.
 */
export function remoteSendingSections(sdp) {
  const sections = [];
  for (const block of sdp.split(/\r?\nm=/).slice(1)) {
    const lines = block.split(/\r?\n/);
    const [kind, port] = lines[0].split(" ");
    let mid = null;
    let direction = "sendrecv";
    let streamId = null;
    for (const line of lines) {
      if (line.startsWith("a=mid:")) mid = line.slice(6).trim();
      else if (/^a=(sendrecv|sendonly|recvonly|inactive)$/.test(line.trim())) direction = line.trim().slice(2);
      else if (line.startsWith("a=msid:")) streamId = line.slice(7).split(" ")[0].trim();
    }
    const sends = (direction === "sendrecv" || direction === "sendonly") && port !== "0";
    if (sends && mid !== null && streamId && streamId !== "-") sections.push({ kind, mid, streamId });
  }
  return sections;
}

export class Call extends EventTarget {
  /**
   * @param {object} o
   * @param {import("./matrix.js").MatrixClient} o.client
   * @param {string} o.roomId
   * @param {string} o.callId
   * @param {"outbound"|"inbound"} o.direction
   * @param {string} o.opponent  the other party's user id (the bot for a conference)
   * @param {"video"|"voice"} o.kind
   * @param {boolean} o.conference  the other party is the conference bot
   * @param {boolean} o.relayOnly  iceTransportPolicy "relay"
   * @param {boolean} o.singleStream  ask the bot for one mixed stream instead of one per participant
   * @param {MediaTrackConstraints} o.videoConstraints
   */
  constructor(o) {
    super();
    Object.assign(this, {
      client: o.client,
      roomId: o.roomId,
      callId: o.callId,
      direction: o.direction,
      opponent: o.opponent,
      kind: o.kind,
      conference: !!o.conference,
      relayOnly: !!o.relayOnly,
      singleStream: !!o.singleStream,
      videoConstraints: o.videoConstraints || true,
    });
    this.partyId = o.client.deviceId;
    this.polite = o.direction === "inbound";
    this.state = o.direction === "inbound" ? "ringing" : "inviting";
    this.opponentPartyId = null;
    this.remoteMetadata = {};
    this.remoteStreams = [];
    this.localStream = null;
    this.pc = null;
    this.micMuted = false;
    this.cameraOff = false;
    this.signalled = false; // our SDP went out: candidates may follow
    this.outgoingCandidates = [];
    this.candidateTimer = null;
    this.remoteCandidates = new Map(); // party id → candidates buffered before selection
    this.chain = Promise.resolve(); // signalling work, one step at a time
    this.makingOffer = false;
    this.timers = new Set();
    this.endInfo = null;
  }

  /** An incoming m.call.invite becomes a ringing call. */
  static fromInvite(client, roomId, sender, content) {
    const video = /\nm=video /.test(content.offer.sdp);
    const call = new Call({
      client,
      roomId,
      callId: content.call_id,
      direction: "inbound",
      opponent: sender,
      kind: video ? "video" : "voice",
    });
    call.remoteOffer = content.offer;
    call.opponentPartyId = content.party_id ?? null;
    call.remoteVersion = content.version;
    Object.assign(call.remoteMetadata, metadataOf(content) || {});
    const lifetime = Math.min(Number(content.lifetime) || INVITE_LIFETIME_MS, 10 * 60000);
    call.after(lifetime, () => {
      if (call.state === "ringing") call.end("invite_timeout", "Missed call: it stopped ringing.", false);
    });
    return call;
  }

  get ended() {
    return this.state === "ended";
  }

  setState(state) {
    if (this.state === state || this.ended) return;
    this.state = state;
    if (state === "connecting") {
      // Both descriptions are (about to be) set: no media path by now means ICE failed.
      this.after(CONNECT_TIMEOUT_MS, () => {
        if (this.state === "connecting") this.failIce();
      });
    }
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  after(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  /** Runs signalling steps strictly in order; an exception ends the call. */
  enqueue(step) {
    this.chain = this.chain.then(async () => {
      if (this.ended) return;
      try {
        await step();
      } catch (e) {
        console.error("call step failed", e);
        this.fail("unknown_error", `The call failed: ${e?.message || e}`);
      }
    });
    return this.chain;
  }

  // ---- our side ----------------------------------------------------------

  async openMedia() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw Object.assign(new Error("no mediaDevices"), { name: "InsecureContext" });
    }
    const constraints = { audio: true, video: this.kind === "video" ? this.videoConstraints : false };
    this.localStream = await navigator.mediaDevices.getUserMedia(constraints);
    if (this.ended) this.stopLocal();
    this.dispatchEvent(new CustomEvent("streams"));
  }

  async createPeer() {
    let iceServers = [];
    try {
      iceServers = await this.client.iceServers();
    } catch (e) {
      console.warn("no TURN servers from the homeserver", e);
    }
    if (this.relayOnly && iceServers.length === 0) {
      throw Object.assign(new Error("relay only without TURN"), { relayUnavailable: true });
    }
    const pc = new RTCPeerConnection({
      iceServers,
      iceTransportPolicy: this.relayOnly ? "relay" : "all",
      bundlePolicy: "max-bundle",
    });
    this.pc = pc;
    pc.addEventListener("icecandidate", (e) => this.onLocalCandidate(e.candidate));
    pc.addEventListener("connectionstatechange", () => this.onConnectionState());
    pc.addEventListener("track", () => this.updateStreams());
    return pc;
  }

  ownMetadata() {
    if (!this.localStream) return {};
    return {
      [this.localStream.id]: {
        purpose: "m.usermedia",
        audio_muted: this.micMuted,
        video_muted: this.cameraOff || this.kind !== "video",
      },
    };
  }

  content(extra) {
    return { call_id: this.callId, party_id: this.partyId, version: "1", ...extra };
  }

  send(type, extra, options) {
    return this.client.send(this.roomId, type, this.content(extra), options);
  }

  /** Waits until ICE gathering completes, or at most `GATHER_WAIT_MS`. */
  gathered() {
    const pc = this.pc;
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        pc.removeEventListener("icegatheringstatechange", check);
        clearTimeout(timer);
        resolve();
      };
      const check = () => pc.iceGatheringState === "complete" && done();
      const timer = setTimeout(done, GATHER_WAIT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  /** Our SDP is read now: the candidates found so far are in it. */
  sdpTaken() {
    // Those need not be trickled; the end-of-candidates marker must be.
    this.outgoingCandidates = this.outgoingCandidates.filter((c) => c.candidate === "");
  }

  /** Our SDP went out: trickle the candidates found since. */
  sdpSent() {
    this.signalled = true;
    this.scheduleCandidates();
  }

  onLocalCandidate(candidate) {
    if (this.ended) return;
    this.outgoingCandidates.push(
      candidate
        ? { candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex }
        : { candidate: "" },
    );
    this.scheduleCandidates();
  }

  scheduleCandidates() {
    if (!this.signalled || this.candidateTimer || this.outgoingCandidates.length === 0) return;
    this.candidateTimer = this.after(CANDIDATE_BATCH_MS, () => {
      this.candidateTimer = null;
      const candidates = this.outgoingCandidates.splice(0);
      if (candidates.length && !this.ended) {
        this.send("m.call.candidates", { candidates }).catch((e) => console.warn("candidates not sent", e));
      }
    });
  }

  /** Outbound: get media, offer, send m.call.invite. */
  place() {
    return this.enqueue(async () => {
      try {
        await this.openMedia();
      } catch (e) {
        return this.end("user_media_failed", mediaErrorMessage(e), true);
      }
      const pc = await this.createPeerOrFail();
      if (!pc) return;
      for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
      this.makingOffer = true;
      try {
        await pc.setLocalDescription(await pc.createOffer());
        await this.gathered();
      } finally {
        this.makingOffer = false;
      }
      if (this.ended) return;
      const offer = { type: "offer", sdp: pc.localDescription.sdp };
      this.sdpTaken();
      const invite = {
        offer,
        lifetime: INVITE_LIFETIME_MS,
        invitee: this.opponent,
        sdp_stream_metadata: this.ownMetadata(),
      };
      // Switchboard's conference bot: the mix-minus of the others' audio and the
      // active speaker's video on our own m-lines.
      if (this.conference && this.singleStream) invite["io.switchboard.single_stream"] = true;
      await this.send("m.call.invite", invite);
      this.sdpSent(); // only now: candidates sent before the invite would be dropped
      this.after(INVITE_LIFETIME_MS, () => {
        if (this.state === "inviting") this.hangup("invite_timeout", "No answer.");
      });
    });
  }

  async createPeerOrFail() {
    try {
      return await this.createPeer();
    } catch (e) {
      if (e.relayUnavailable) {
        this.end(
          "unknown_error",
          "“Relay only” needs a TURN server, and this homeserver offers none (/voip/turnServer is empty). Turn “Relay only” off, or configure turn.uris.",
          true,
        );
      } else {
        this.end("unknown_error", `Could not start the call: ${e.message}`, true);
      }
      return null;
    }
  }

  /** Inbound: answer the ringing call. */
  answer() {
    if (this.state !== "ringing") return Promise.resolve();
    this.setState("connecting");
    return this.enqueue(async () => {
      try {
        await this.openMedia();
      } catch (e) {
        await this.send("m.call.hangup", { reason: "user_media_failed" }).catch(() => {});
        return this.end("user_media_failed", mediaErrorMessage(e), true);
      }
      const pc = await this.createPeerOrFail();
      if (!pc) {
        await this.send("m.call.hangup", { reason: "unknown_error" }).catch(() => {});
        return;
      }
      await pc.setRemoteDescription(this.remoteOffer);
      for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
      await pc.setLocalDescription(await pc.createAnswer());
      await this.gathered();
      if (this.ended) return;
      const answer = { type: "answer", sdp: pc.localDescription.sdp };
      this.sdpTaken();
      await this.send("m.call.answer", {
        answer,
        sdp_stream_metadata: this.ownMetadata(),
      });
      this.sdpSent();
      await this.addBufferedCandidates(this.opponentPartyId);
      this.updateStreams();
    });
  }

  /** Inbound, still ringing: decline with m.call.reject. */
  reject() {
    if (this.state !== "ringing") return;
    // Version 0 callers know no m.call.reject: they are declined with a hangup.
    const decline = this.remoteVersion === 0 ? this.send("m.call.hangup", { reason: "user_hangup" }) : this.send("m.call.reject", {});
    decline.catch((e) => console.warn("decline not sent", e));
    this.end("user_hangup", "You declined the call.", false);
  }

  /** Ends the call from our side (m.call.hangup). */
  hangup(reason = "user_hangup", message = "Call ended.") {
    if (this.ended) return;
    if (this.state === "ringing") return this.reject();
    // keepalive: the hangup still goes out when the page is being closed.
    this.send("m.call.hangup", { reason }, { keepalive: true }).catch((e) => console.warn("hangup not sent", e));
    this.end(reason, message, reason !== "user_hangup");
  }

  setMicMuted(muted) {
    this.micMuted = muted;
    for (const t of this.localStream?.getAudioTracks() || []) t.enabled = !muted;
    this.sendMetadataChanged();
  }

  setCameraOff(off) {
    this.cameraOff = off;
    for (const t of this.localStream?.getVideoTracks() || []) t.enabled = !off;
    this.sendMetadataChanged();
  }

  sendMetadataChanged() {
    this.dispatchEvent(new CustomEvent("streams"));
    if (!this.signalled || this.ended) return;
    this.send("m.call.sdp_stream_metadata_changed", { sdp_stream_metadata: this.ownMetadata() }).catch((e) =>
      console.warn("metadata not sent", e),
    );
  }

  // ---- their side ----------------------------------------------------------

  /** Is this event from the party we talk to (or, before one is chosen, a candidate party)? */
  fromOpponent(sender, content) {
    if (sender === this.client.userId && content.party_id === this.partyId) return false; // our echo
    // The invitee (or caller), on the device that answered (or called): the first
    // answer chooses the party; events without a party id come from v0 peers.
    return (
      sender === this.opponent &&
      (this.opponentPartyId === null || content.party_id === undefined || content.party_id === this.opponentPartyId)
    );
  }

  /** A call event of this call id from the room. */
  handleEvent(type, sender, content) {
    if (this.ended) return;
    // Our own user on another device answered or declined a call ringing here.
    if (sender === this.client.userId && content.party_id !== this.partyId) {
      if (this.state === "ringing" && (type === "m.call.answer" || type === "m.call.reject")) {
        this.end("answered_elsewhere", "Answered on another device.", false);
      }
      return;
    }
    if (!this.fromOpponent(sender, content)) return;
    const metadata = metadataOf(content);
    if (metadata) Object.assign(this.remoteMetadata, metadata);
    switch (type) {
      case "m.call.answer":
        return this.enqueue(() => this.onAnswer(content));
      case "m.call.candidates":
        return this.enqueue(() => this.onCandidates(content));
      case "m.call.select_answer":
        if (this.direction === "inbound" && content.selected_party_id !== this.partyId) {
          this.end("answered_elsewhere", "The call was answered on another device.", false);
        }
        return;
      case "m.call.reject":
        if (this.state === "inviting") {
          this.send("m.call.select_answer", { selected_party_id: content.party_id }).catch(() => {});
          this.end("rejected", `${this.opponentName()} declined the call.`, true);
        }
        return;
      case "m.call.hangup":
        return this.onHangup(content);
      case "m.call.negotiate":
        return this.enqueue(() => this.onNegotiate(content));
      case "m.call.sdp_stream_metadata_changed":
      case "org.matrix.call.sdp_stream_metadata_changed":
        return this.updateStreams();
      default:
    }
  }

  opponentName() {
    return this.conference ? "The conference bot" : this.opponent;
  }

  async onAnswer(content) {
    if (this.direction !== "outbound" || this.state !== "inviting" || !this.pc) return;
    this.opponentPartyId = content.party_id ?? null;
    this.setState("connecting");
    await this.pc.setRemoteDescription(content.answer);
    if (content.party_id !== undefined) {
      await this.send("m.call.select_answer", { selected_party_id: content.party_id });
    }
    await this.addBufferedCandidates(this.opponentPartyId);
    this.updateStreams();
  }

  async onCandidates(content) {
    const list = Array.isArray(content.candidates) ? content.candidates : [];
    const party = content.party_id ?? null;
    const ready = this.pc?.remoteDescription && (this.opponentPartyId === null ? this.direction === "inbound" : party === this.opponentPartyId || party === null);
    if (!ready) {
      const buffered = this.remoteCandidates.get(party) || [];
      buffered.push(...list);
      this.remoteCandidates.set(party, buffered);
      return;
    }
    await this.addCandidates(list);
  }

  async addBufferedCandidates(party) {
    const list = this.remoteCandidates.get(party ?? null) || [];
    this.remoteCandidates.clear();
    await this.addCandidates(list);
  }

  async addCandidates(list) {
    for (const c of list) {
      if (typeof c?.candidate !== "string") continue;
      try {
        if (c.candidate === "") await this.pc.addIceCandidate();
        else await this.pc.addIceCandidate({ candidate: c.candidate, sdpMid: c.sdpMid ?? null, sdpMLineIndex: c.sdpMLineIndex ?? null });
      } catch (e) {
        console.warn("a remote candidate was not accepted", e);
      }
    }
  }

  /** Perfect negotiation: the caller is impolite, the callee polite. */
  async onNegotiate(content) {
    const description = content.description;
    if (!this.pc || !description?.sdp) return;
    if (description.type === "offer") {
      const collision = this.makingOffer || this.pc.signalingState !== "stable";
      if (collision && !this.polite) return; // they roll back and retry
      await this.pc.setRemoteDescription(description);
      await this.pc.setLocalDescription(await this.pc.createAnswer());
      await this.send("m.call.negotiate", {
        description: { type: "answer", sdp: this.pc.localDescription.sdp },
        lifetime: NEGOTIATE_LIFETIME_MS,
        sdp_stream_metadata: this.ownMetadata(),
      });
    } else if (description.type === "answer" && this.pc.signalingState === "have-local-offer") {
      await this.pc.setRemoteDescription(description);
    }
    this.updateStreams();
  }

  onHangup(content) {
    const reason = content.reason || "user_hangup";
    if (this.state === "ringing") return this.end(reason, `Missed call from ${this.opponent}.`, false);
    if (this.state === "inviting" && reason === "user_busy") return this.end(reason, `${this.opponentName()} is busy.`, true);
    const messages = {
      ice_failed: `${this.opponentName()} could not connect (ICE failed).${this.relayOnly ? RELAY_HINT : ""}`,
      ice_timeout: "The connection was lost (ICE timeout).",
      invite_timeout: "The call was not answered in time.",
      user_media_failed: `${this.opponentName()} could not open a camera or microphone.`,
    };
    this.end(reason, messages[reason] || `${this.opponentName()} hung up.`, reason in messages);
  }

  onConnectionState() {
    const state = this.pc?.connectionState;
    if (state === "connected") this.setState("connected");
    else if (state === "failed") this.failIce();
    else if (state === "disconnected" && this.state === "connected") {
      this.setState("reconnecting");
      this.after(CONNECT_TIMEOUT_MS, () => {
        if (this.state === "reconnecting") this.hangup("ice_timeout", "The connection was lost (ICE timeout).");
      });
    }
  }

  failIce() {
    const hint = this.relayOnly
      ? RELAY_HINT
      : " No network path was found between you (a firewall or NAT may block it; a TURN server helps).";
    this.hangup("ice_failed", `The connection failed (ICE failed).${hint}`);
  }

  fail(reason, message) {
    this.hangup(reason, message);
  }

  /** Recomputes the remote streams from the remote SDP and the transceivers. */
  updateStreams() {
    if (!this.pc?.remoteDescription) {
      this.dispatchEvent(new CustomEvent("streams"));
      return;
    }
    const sections = remoteSendingSections(this.pc.remoteDescription.sdp);
    const peerLabels = Object.keys(this.remoteMetadata).length > 0;
    const byStream = new Map();
    for (const section of sections) {
      // A peer that labels its streams shows only the labelled ones (as js-sdk does).
      if (peerLabels && !this.remoteMetadata[section.streamId]) continue;
      const transceiver = this.pc.getTransceivers().find((t) => t.mid === section.mid);
      if (!transceiver) continue;
      const entry = byStream.get(section.streamId) || { streamId: section.streamId, tracks: [] };
      entry.tracks.push(transceiver.receiver.track);
      byStream.set(section.streamId, entry);
    }
    const previous = new Map(this.remoteStreams.map((s) => [s.streamId, s]));
    this.remoteStreams = [...byStream.values()].map((entry) => {
      const meta = this.remoteMetadata[entry.streamId] || {};
      const old = previous.get(entry.streamId);
      let stream = old?.stream;
      const same = stream && stream.getTracks().length === entry.tracks.length && entry.tracks.every((t) => stream.getTracks().includes(t));
      if (!same) stream = new MediaStream(entry.tracks);
      return {
        streamId: entry.streamId,
        userId: meta.user_id || this.opponent,
        deviceId: meta.device_id || "",
        audioMuted: !!meta.audio_muted,
        videoMuted: !!meta.video_muted,
        hasVideo: entry.tracks.some((t) => t.kind === "video"),
        stream,
        trackIds: entry.tracks.map((t) => t.id),
      };
    });
    this.dispatchEvent(new CustomEvent("streams"));
  }

  stopLocal() {
    for (const t of this.localStream?.getTracks() || []) t.stop();
  }

  end(reason, message, isError) {
    if (this.ended) return;
    this.state = "ended";
    this.endInfo = { reason, message, isError };
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.stopLocal();
    try {
      this.pc?.close();
    } catch {
      // already closed
    }
    this.remoteStreams = [];
    this.dispatchEvent(new CustomEvent("state", { detail: "ended" }));
    this.dispatchEvent(new CustomEvent("ended", { detail: this.endInfo }));
  }
}
