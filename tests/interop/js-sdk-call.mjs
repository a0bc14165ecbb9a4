// matrix-js-sdk's own VoIP (`MatrixCall`, the call implementation of Element
// Web's legacy calls) in a browser page: tests/browser/web-e2e.mjs bundles this
// file with esbuild, adds it to a page of the server under test and drives it
// through `window.jsSdk`. A user registers, syncs, and calls the conference
// bot; `status()` reports the call as matrix-js-sdk sees it.

import * as sdk from "matrix-js-sdk";

let client = null;
let call = null;
/** The last call someone placed to us (matrix-js-sdk's incoming-call event). */
let incoming = null;

/** Registers `user` with the dummy auth flow and starts syncing. */
async function start({ baseUrl, user, password }) {
  const anonymous = sdk.createClient({ baseUrl });
  let session;
  try {
    await anonymous.registerRequest({ username: user, password });
  } catch (e) {
    session = e.data?.session;
    if (!session) throw e;
  }
  const login = await anonymous.registerRequest({
    username: user,
    password,
    auth: { type: "m.login.dummy", session },
  });
  client = sdk.createClient({
    baseUrl,
    userId: login.user_id,
    accessToken: login.access_token,
    deviceId: login.device_id,
  });
  const prepared = new Promise((resolve) => {
    client.on(sdk.ClientEvent.Sync, (state) => {
      if (state === "PREPARED") resolve();
    });
  });
  client.on("Call.incoming", (c) => {
    incoming = c;
  });
  await client.startClient({ initialSyncLimit: 10 });
  await prepared;
  return login.user_id;
}

async function createRoom(invite, initialState = []) {
  const { room_id: roomId } = await client.createRoom({ preset: "private_chat", invite, initial_state: initialState });
  return roomId;
}

async function join(roomId) {
  await client.joinRoom(roomId);
}

async function joinedMembers(roomId) {
  return Object.keys((await client.getJoinedRoomMembers(roomId)).joined);
}

/** Whether the client's store has the room (a call needs its state). */
function knowsRoom(roomId) {
  return !!client.getRoom(roomId)?.getMember(client.getUserId())?.membership;
}

async function sendText(roomId, body) {
  await client.sendTextMessage(roomId, body);
}

/** Rooms we are invited to. */
function invites() {
  return client
    .getRooms()
    .filter((room) => room.getMyMembership() === "invite")
    .map((room) => room.roomId);
}

/** Answers the incoming call in `roomId` with camera and microphone; false if none rang yet. */
async function answerIncoming(roomId) {
  if (incoming?.roomId !== roomId || incoming.state !== "ringing") return false;
  call = incoming;
  await call.answer(true, true);
  return true;
}

/** Places a video call (or a voice call) to `invitee` (the bot) in `roomId`. */
async function placeCall(roomId, invitee, voice = false) {
  call = sdk.createNewMatrixCall(client, roomId, { invitee });
  if (!call) throw new Error("matrix-js-sdk cannot place calls in this browser");
  await (voice ? call.placeVoiceCall() : call.placeVideoCall());
}

/**
 * What the browser learnt of its own audio from the far end's receiver
 * reports (remote-inbound-rtp), and the audio packets it received.
 */
async function audioReports() {
  const stats = await call.peerConn.getStats();
  const out = { packetsIn: 0, reports: [] };
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") out.packetsIn += s.packetsReceived || 0;
    if (s.type === "remote-inbound-rtp" && s.kind === "audio") {
      out.reports.push({
        packetsLost: s.packetsLost,
        fractionLost: s.fractionLost,
        jitter: s.jitter,
        roundTripTime: s.roundTripTime,
        reportsReceived: s.reportsReceived,
      });
    }
  });
  return out;
}

/** The call as matrix-js-sdk sees it, and the bytes its peer connection received. */
async function status() {
  if (!call) return null;
  let bytesIn = 0;
  if (call.peerConn) {
    const stats = await call.peerConn.getStats();
    stats.forEach((s) => {
      if (s.type === "inbound-rtp") bytesIn += s.bytesReceived || 0;
    });
  }
  return {
    state: call.state,
    hangupReason: call.hangupReason ?? null,
    localStreams: call.getLocalFeeds().map((feed) => feed.stream.id),
    remoteFeeds: call.getRemoteFeeds().map((feed) => ({
      stream: feed.stream.id,
      userId: feed.userId,
      purpose: feed.purpose,
      audio: feed.stream.getAudioTracks().length,
      video: feed.stream.getVideoTracks().length,
    })),
    bytesIn,
    transceivers: call.peerConn ? call.peerConn.getTransceivers().length : 0,
  };
}

/**
 * Shares a "screen" as matrix-js-sdk's `setScreensharingEnabled` does once it
 * has the stream (here a canvas, not getDisplayMedia): a new local feed with
 * purpose m.screenshare, added with `addTrack`. Returns the stream id and
 * whether the browser reused a transceiver it had (one of the SFU's).
 */
async function shareScreen() {
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 180;
  const paint = canvas.getContext("2d");
  let frame = 0;
  setInterval(() => {
    paint.fillStyle = `hsl(${(frame += 7) % 360}, 80%, 50%)`;
    paint.fillRect(0, 0, canvas.width, canvas.height);
  }, 40);
  const stream = canvas.captureStream(25);
  const before = new Set(call.peerConn.getTransceivers().map((t) => t.mid).filter(Boolean));
  call.pushNewLocalFeed(stream, "m.screenshare");
  const track = stream.getVideoTracks()[0];
  const transceiver = call.peerConn.getTransceivers().find((t) => t.sender.track === track);
  return { stream: stream.id, reused: Boolean(transceiver?.mid && before.has(transceiver.mid)) };
}

/** Ends the screen share as matrix-js-sdk does: its senders are removed. */
async function stopScreenShare() {
  await call.setScreensharingEnabled(false);
}

async function hangup() {
  call?.hangup("user_hangup", false);
}

window.jsSdk = {
  start,
  createRoom,
  join,
  joinedMembers,
  knowsRoom,
  sendText,
  invites,
  answerIncoming,
  placeCall,
  audioReports,
  status,
  shareScreen,
  stopScreenShare,
  hangup,
};
