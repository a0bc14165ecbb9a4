// The Switchboard web demo: log in, rooms, 1:1 calls and conferences through
// the conference bot. No framework: the DOM is updated from a small model
// that /sync fills.

import { MatrixClient, MatrixError, UnreachableError, normaliseBaseUrl } from "./matrix.js";
import { Call, CALL_EVENT_TYPES, newCallId } from "./call.js";
import { readStats, formatBitrate, formatBytes, describePair } from "./stats.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const store = {
  get: (k) => localStorage.getItem(`switchboard.${k}`),
  set: (k, v) => localStorage.setItem(`switchboard.${k}`, v),
  del: (k) => localStorage.removeItem(`switchboard.${k}`),
};

/** `?lowres` asks for small video (phones, slow machines, the browser tests). */
const VIDEO = params.has("lowres")
  ? { width: { ideal: 320 }, height: { ideal: 180 }, frameRate: { ideal: 15 } }
  : { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 24 } };

const state = {
  client: null,
  since: null,
  syncAbort: null,
  rooms: new Map(), // room id → {id, name, members: Map(user → membership)}
  invites: new Map(), // room id → {name, inviter}
  selected: null,
  call: null, // the current call (placing, ringing, active)
  seenCalls: new Set(), // call ids already handled (late events are ignored)
  statsTimer: null,
  lastStats: null,
};

// ---- small helpers ---------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) node.append(child);
  return node;
}

function localpart(userId) {
  return userId.startsWith("@") ? userId.slice(1).split(":")[0] : userId;
}

function botId() {
  return `@conference:${state.client.serverName}`;
}

function showBanner(message, isError = false) {
  $("banner-text").textContent = message;
  $("banner").classList.toggle("error", isError);
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function errorText(e) {
  if (e instanceof UnreachableError) return e.message;
  if (e instanceof MatrixError) {
    const known = {
      M_FORBIDDEN: "Wrong username or password.",
      M_USER_IN_USE: "That username is taken: log in instead, or pick another.",
      M_INVALID_USERNAME: "That username is not allowed (use lower-case letters, digits and . _ = - /).",
      M_LIMIT_EXCEEDED: "Too many attempts: wait a moment and try again.",
    };
    return known[e.errcode] || e.message;
  }
  return e?.message || String(e);
}

// ---- login -----------------------------------------------------------------

function showLogin() {
  $("login-view").hidden = false;
  $("home-view").hidden = true;
  $("account").hidden = true;
  $("hs-url").value = params.get("homeserver") || store.get("homeserver") || location.origin;
}

async function onLoginSubmit(event) {
  event.preventDefault();
  const register = event.submitter?.value === "register";
  const baseUrl = normaliseBaseUrl($("hs-url").value);
  const username = $("username").value.trim().replace(/^@/, "").split(":")[0];
  const password = $("password").value;
  $("login-error").textContent = "";
  if (!baseUrl || !username || !password) {
    $("login-error").textContent = "Fill in the homeserver, a username and a password.";
    return;
  }
  for (const b of document.querySelectorAll("#login-form button")) b.disabled = true;
  $("login-error").textContent = register ? "Registering…" : "Logging in…";
  try {
    const client = register
      ? await MatrixClient.register(baseUrl, username, password)
      : await MatrixClient.login(baseUrl, username, password);
    store.set("homeserver", baseUrl);
    store.set("session", JSON.stringify(client.session));
    $("login-error").textContent = "";
    $("password").value = "";
    start(client);
  } catch (e) {
    $("login-error").textContent = errorText(e);
  } finally {
    for (const b of document.querySelectorAll("#login-form button")) b.disabled = false;
  }
}

async function logout() {
  state.call?.hangup();
  state.syncAbort?.abort();
  const client = state.client;
  state.client = null;
  store.del("session");
  state.rooms.clear();
  state.invites.clear();
  state.selected = null;
  showLogin();
  try {
    await client?.logout();
  } catch {
    // the token is forgotten here either way
  }
}

function start(client) {
  state.client = client;
  state.since = null;
  $("login-view").hidden = true;
  $("home-view").hidden = false;
  $("account").hidden = false;
  $("whoami").textContent = client.userId;
  $("relay-only").checked = store.get("relayOnly") === "1";
  renderRooms();
  renderRoom();
  syncLoop(client);
}

// ---- sync ------------------------------------------------------------------

async function syncLoop(client) {
  const abort = new AbortController();
  state.syncAbort = abort;
  let backoff = 500;
  let lost = false;
  while (state.client === client && !abort.signal.aborted) {
    try {
      const initial = state.since === null;
      const response = await client.sync(state.since, initial ? 0 : 30000, abort.signal);
      if (state.client !== client) return;
      applySync(response, initial);
      state.since = response.next_batch;
      backoff = 500;
      if (lost) {
        lost = false;
        hideBanner();
      }
    } catch (e) {
      if (abort.signal.aborted || state.client !== client) return;
      if (e instanceof MatrixError && e.errcode === "M_UNKNOWN_TOKEN") {
        showBanner("You were logged out (the session is no longer valid). Log in again.", true);
        store.del("session");
        state.client = null;
        showLogin();
        return;
      }
      lost = true;
      showBanner(`${errorText(e)} Retrying…`, true);
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 15000);
    }
  }
}

function roomOf(roomId) {
  let room = state.rooms.get(roomId);
  if (!room) {
    room = { id: roomId, name: "", members: new Map() };
    state.rooms.set(roomId, room);
  }
  return room;
}

function applyState(room, event) {
  if (event.type === "m.room.name") room.name = event.content?.name || "";
  else if (event.type === "m.room.member" && typeof event.state_key === "string") {
    room.members.set(event.state_key, event.content?.membership || "leave");
  }
}

function applySync(response, initial) {
  const rooms = response.rooms || {};
  const callEvents = [];
  for (const [roomId, joined] of Object.entries(rooms.join || {})) {
    state.invites.delete(roomId);
    const room = roomOf(roomId);
    for (const event of joined.state?.events || []) applyState(room, event);
    for (const event of joined.timeline?.events || []) {
      if (typeof event.state_key === "string") applyState(room, event);
      if (!initial && CALL_EVENT_TYPES.has(event.type)) callEvents.push([roomId, event]);
      if (event.type === "m.room.member" && event.content?.membership !== "join" && state.call?.roomId === roomId) {
        if (event.state_key === state.call.opponent && state.call.state !== "ended") {
          state.call.end("user_hangup", `${state.call.opponentName()} left the room.`, false);
        }
      }
    }
  }
  for (const [roomId, invited] of Object.entries(rooms.invite || {})) {
    let name = "";
    let inviter = "";
    for (const event of invited.invite_state?.events || []) {
      if (event.type === "m.room.name") name = event.content?.name || "";
      if (event.type === "m.room.member" && event.state_key === state.client.userId) inviter = event.sender;
    }
    state.invites.set(roomId, { name, inviter });
  }
  for (const roomId of Object.keys(rooms.leave || {})) {
    state.rooms.delete(roomId);
    state.invites.delete(roomId);
    if (state.selected === roomId) state.selected = null;
    if (state.call?.roomId === roomId) state.call.hangup();
  }
  for (const [roomId, event] of callEvents) onCallEvent(roomId, event);
  renderRooms();
  renderRoom();
}

// ---- rooms -----------------------------------------------------------------

function roomName(room) {
  if (room.name) return room.name;
  const others = [...room.members].filter(([u, m]) => u !== state.client.userId && m === "join").map(([u]) => localpart(u));
  return others.length ? others.join(", ") : "Empty room";
}

function renderRooms() {
  if (!state.client) return;
  const invites = $("invites");
  invites.replaceChildren(
    ...[...state.invites].map(([roomId, invite]) =>
      el(
        "li",
        { "data-room-id": roomId },
        el("span", { class: "name" }, `${invite.name || "A room"} — invited by ${invite.inviter || "someone"}`),
        el(
          "span",
          {},
          el("button", { type: "button", onclick: () => acceptInvite(roomId), "aria-label": `Join ${invite.name || "the room"}` }, "Join"),
          " ",
          el("button", { type: "button", class: "secondary", onclick: () => declineInvite(roomId) }, "Decline"),
        ),
      ),
    ),
  );
  const list = [...state.rooms.values()].sort((a, b) => roomName(a).localeCompare(roomName(b)));
  $("room-list").replaceChildren(
    ...list.map((room) =>
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            class: "room",
            "aria-current": room.id === state.selected ? "true" : "false",
            onclick: () => {
              state.selected = room.id;
              renderRooms();
              renderRoom();
            },
          },
          roomName(room),
        ),
      ),
    ),
  );
  $("no-rooms").hidden = list.length + state.invites.size > 0;
}

function renderRoom() {
  if (!state.client) return;
  const inCall = state.call && state.call.state !== "ringing" && !state.call.ended;
  $("call-view").hidden = !inCall;
  $("room-view").hidden = !!inCall;
  const room = state.selected && state.rooms.get(state.selected);
  $("no-room").hidden = !!room;
  $("room-detail").hidden = !room;
  if (!room) return;
  $("room-name").textContent = roomName(room);
  const bot = botId();
  const botMembership = room.members.get(bot);
  $("invite-bot").hidden = botMembership === "join" || botMembership === "invite";
  $("conference-hint").textContent =
    botMembership === "join"
      ? "The conference bot is here: everyone who joins the conference sees everyone else."
      : "Joining the conference invites the conference bot to this room first.";
  const me = state.client.userId;
  const members = [...room.members].filter(([, m]) => m === "join" || m === "invite").sort(([a], [b]) => a.localeCompare(b));
  $("members").replaceChildren(
    ...members.map(([userId, membership]) => {
      const callable = userId !== me && userId !== bot && membership === "join";
      return el(
        "li",
        { "data-user-id": userId },
        el(
          "span",
          { class: "name" },
          userId,
          " ",
          el("span", { class: "badge" }, userId === me ? "(you)" : userId === bot ? "(conference bot)" : membership === "invite" ? "(invited)" : ""),
        ),
        callable
          ? el(
              "span",
              {},
              el("button", { type: "button", onclick: () => placeCall(room.id, userId, "video"), "aria-label": `Video call ${userId}` }, "Video call"),
              " ",
              el("button", { type: "button", class: "secondary", onclick: () => placeCall(room.id, userId, "voice"), "aria-label": `Voice call ${userId}` }, "Voice call"),
            )
          : "",
      );
    }),
  );
}

async function acceptInvite(roomId) {
  try {
    await state.client.join(roomId);
    state.invites.delete(roomId);
    roomOf(roomId);
    state.selected = roomId;
    renderRooms();
    renderRoom();
  } catch (e) {
    showBanner(`Could not join: ${errorText(e)}`, true);
  }
}

async function declineInvite(roomId) {
  try {
    await state.client.leave(roomId);
    state.invites.delete(roomId);
    renderRooms();
  } catch (e) {
    showBanner(`Could not decline: ${errorText(e)}`, true);
  }
}

async function onCreateRoom(event) {
  event.preventDefault();
  const name = $("new-room-name").value.trim();
  const invite = $("new-room-invite")
    .value.split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
  if ($("new-room-bot").checked) invite.push(botId());
  try {
    const { room_id: roomId } = await state.client.createRoom({ name, invite });
    const room = roomOf(roomId);
    room.name = name;
    room.members.set(state.client.userId, "join");
    for (const user of invite) room.members.set(user, "invite");
    state.selected = roomId;
    $("create-room-form").reset();
    renderRooms();
    renderRoom();
  } catch (e) {
    showBanner(`Could not create the room: ${errorText(e)}`, true);
  }
}

async function invite(userId) {
  const roomId = state.selected;
  if (!roomId) return;
  try {
    await state.client.invite(roomId, userId);
    roomOf(roomId).members.set(userId, "invite");
    renderRoom();
  } catch (e) {
    showBanner(`Could not invite ${userId}: ${errorText(e)}`, true);
  }
}

async function leaveRoom() {
  const roomId = state.selected;
  if (!roomId) return;
  try {
    await state.client.leave(roomId);
    state.rooms.delete(roomId);
    state.selected = null;
    renderRooms();
    renderRoom();
  } catch (e) {
    showBanner(`Could not leave: ${errorText(e)}`, true);
  }
}

// ---- calls -----------------------------------------------------------------

function busy() {
  return state.call && !state.call.ended;
}

function attach(call) {
  state.call = call;
  state.seenCalls.add(call.callId);
  call.addEventListener("state", renderCall);
  call.addEventListener("streams", renderTiles);
  call.addEventListener("ended", (e) => {
    const { message, isError } = e.detail;
    showBanner(message, isError);
    stopStats();
    $("incoming").hidden = true;
    renderRoom();
  });
}

function placeCall(roomId, opponent, kind, conference = false, singleStream = false) {
  if (busy()) {
    showBanner("You are already in a call: hang up first.", true);
    return null;
  }
  hideBanner();
  const call = new Call({
    client: state.client,
    roomId,
    callId: newCallId(),
    direction: "outbound",
    opponent,
    kind,
    conference,
    singleStream,
    relayOnly: $("relay-only").checked,
    videoConstraints: VIDEO,
  });
  attach(call);
  renderCall();
  call.place();
  startStats();
  return call;
}

async function joinConference() {
  const roomId = state.selected;
  const room = roomId && state.rooms.get(roomId);
  if (!room) return;
  const bot = botId();
  if (room.members.get(bot) !== "join") {
    if (room.members.get(bot) !== "invite") await invite(bot);
    $("conference-hint").textContent = "Waiting for the conference bot to join…";
    const deadline = Date.now() + 15000;
    while (room.members.get(bot) !== "join" && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
    }
    if (room.members.get(bot) !== "join") {
      showBanner(`The conference bot (${bot}) did not join this room. Is it running on this homeserver?`, true);
      return;
    }
  }
  placeCall(roomId, bot, "video", true, $("single-stream").checked);
}

function onCallEvent(roomId, event) {
  const content = event.content || {};
  const callId = content.call_id;
  if (typeof callId !== "string") return;
  if (state.call && state.call.callId === callId) {
    state.call.handleEvent(event.type, event.sender, content);
    return;
  }
  if (event.type !== "m.call.invite" || state.seenCalls.has(callId)) return;
  const me = state.client.userId;
  if (event.sender === me) return; // our own call, from this or another device
  if (content.invitee && content.invitee !== me) return;
  const lifetime = Number(content.lifetime) || 0;
  if ((event.unsigned?.age || 0) >= lifetime || !content.offer?.sdp) return;
  state.seenCalls.add(callId);
  if (busy()) {
    state.client
      .send(roomId, "m.call.hangup", { call_id: callId, party_id: state.client.deviceId, version: "1", reason: "user_busy" })
      .catch(() => {});
    return;
  }
  const call = Call.fromInvite(state.client, roomId, event.sender, content);
  // The bot dials out too (a room linked to a conference): answering joins it.
  call.conference = event.sender === botId();
  call.relayOnly = $("relay-only").checked;
  call.videoConstraints = VIDEO;
  attach(call);
  hideBanner();
  const room = state.rooms.get(roomId);
  $("incoming-title").textContent = `${event.sender} is calling (${call.kind} call)${room ? ` in ${roomName(room)}` : ""}`;
  $("incoming").hidden = false;
  $("answer").focus();
}

function answerIncoming() {
  const call = state.call;
  if (!call || call.state !== "ringing") return;
  $("incoming").hidden = true;
  call.answer();
  renderCall();
  startStats();
}

function declineIncoming() {
  $("incoming").hidden = true;
  state.call?.reject();
}

const STATUS = {
  inviting: "Calling…",
  ringing: "Ringing…",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Connection interrupted: reconnecting…",
  ended: "Call ended",
};

function renderCall() {
  const call = state.call;
  renderRoom();
  if (!call) return;
  $("call-title").textContent = call.conference ? `Conference in ${roomName(roomOf(call.roomId))}` : `Call with ${call.opponent}`;
  $("call-status").textContent = STATUS[call.state] || call.state;
  $("call-view").dataset.state = call.state;
  $("camera-off").hidden = call.kind !== "video";
  renderTiles();
}

function tile(key, { userId, label, stream, local, muted, videoMuted, hasVideo, streamId }) {
  let node = document.querySelector(`#tiles > [data-key="${CSS.escape(key)}"]`);
  if (!node) {
    const video = el("video", { autoplay: true, playsinline: true });
    video.muted = !!local;
    node = el(
      "figure",
      { class: `tile${local ? " local" : ""}`, "data-key": key },
      video,
      el("div", { class: "avatar", "aria-hidden": "true" }),
      el("figcaption", {}, el("span", { class: "name" }), el("span", { class: "bytes" })),
    );
  }
  node.dataset.userId = userId;
  if (streamId) node.dataset.streamId = streamId;
  const video = node.querySelector("video");
  if (video.srcObject !== stream) video.srcObject = stream;
  const showVideo = hasVideo && !videoMuted;
  video.style.visibility = showVideo ? "visible" : "hidden";
  const avatar = node.querySelector(".avatar");
  avatar.hidden = showVideo;
  avatar.textContent = localpart(userId).slice(0, 1).toUpperCase();
  const flags = [muted ? "microphone off" : "", videoMuted && hasVideo ? "camera off" : ""].filter(Boolean).join(", ");
  node.querySelector(".name").textContent = flags ? `${label} (${flags})` : label;
  node.setAttribute("aria-label", `${label}${flags ? `, ${flags}` : ""}`);
  return node;
}

function renderTiles() {
  const call = state.call;
  const tiles = $("tiles");
  if (!call || call.ended) {
    tiles.replaceChildren();
    return;
  }
  const nodes = [];
  let localTile = null;
  if (call.localStream) {
    localTile = tile("local", {
      userId: state.client.userId,
      label: "You",
      stream: call.localStream,
      local: true,
      muted: call.micMuted,
      videoMuted: call.cameraOff,
      hasVideo: call.kind === "video",
    });
  }
  for (const remote of call.remoteStreams) {
    // One mixed stream from the bot: everyone else's voices and the speaker's video.
    const mix = call.singleStream && remote.userId === botId();
    const node = tile(`remote:${remote.streamId}`, {
      userId: remote.userId,
      label: mix ? "Conference mix" : remote.userId,
      stream: remote.stream,
      muted: remote.audioMuted,
      videoMuted: remote.videoMuted,
      hasVideo: remote.hasVideo,
      streamId: remote.streamId,
    });
    node.classList.add("remote");
    node.dataset.trackIds = remote.trackIds.join(" ");
    nodes.push(node);
  }
  // The others first, yourself last.
  if (localTile) nodes.push(localTile);
  tiles.replaceChildren(...nodes);
  tiles.dataset.remoteCount = String(call.remoteStreams.length);
  $("mute-mic").setAttribute("aria-pressed", String(call.micMuted));
  $("mute-mic").textContent = call.micMuted ? "Unmute microphone" : "Mute microphone";
  $("camera-off").setAttribute("aria-pressed", String(call.cameraOff));
  $("camera-off").textContent = call.cameraOff ? "Turn camera on" : "Turn camera off";
}

// ---- stats -----------------------------------------------------------------

function startStats() {
  stopStats();
  state.lastStats = null;
  for (const id of ["stat-bitrate-in", "stat-bitrate-out", "stat-bytes-in", "stat-loss", "stat-rtt", "stat-pair"]) $(id).textContent = "–";
  $("stat-bytes-in").dataset.value = "0";
  state.statsTimer = setInterval(updateStats, 1000);
}

function stopStats() {
  clearInterval(state.statsTimer);
  state.statsTimer = null;
}

async function updateStats() {
  const call = state.call;
  if (!call?.pc || call.ended) return;
  let s;
  try {
    s = await readStats(call.pc, state.lastStats);
  } catch {
    return; // closed meanwhile
  }
  state.lastStats = s;
  $("stat-bitrate-in").textContent = formatBitrate(s.bitrateIn);
  $("stat-bitrate-out").textContent = formatBitrate(s.bitrateOut);
  $("stat-bytes-in").textContent = formatBytes(s.bytesIn);
  $("stat-bytes-in").dataset.value = String(s.bytesIn);
  $("stat-loss").textContent = `${s.lossPercent.toFixed(1)} %`;
  $("stat-rtt").textContent = s.rttMs === null ? "–" : `${Math.round(s.rttMs)} ms`;
  const pair = $("stat-pair");
  pair.textContent = s.pair ? `${describePair(s.pair)}: ${s.pair.local} → ${s.pair.remote}` : "not connected yet";
  pair.dataset.localType = s.pair?.localType || "";
  pair.dataset.remoteType = s.pair?.remoteType || "";
  pair.dataset.localAddress = s.pair?.localAddress || "";
  pair.dataset.remoteAddress = s.pair?.remoteAddress || "";
  for (const node of document.querySelectorAll("#tiles > .tile.remote")) {
    const ids = (node.dataset.trackIds || "").split(" ").filter(Boolean);
    const bytes = ids.reduce((sum, id) => sum + (s.bytesByTrack.get(id) || 0), 0);
    node.dataset.bytes = String(bytes);
    node.dataset.audioPackets = String(ids.reduce((sum, id) => sum + (s.audioPacketsByTrack.get(id) || 0), 0));
    node.querySelector(".bytes").textContent = formatBytes(bytes);
  }
}

// ---- wiring ----------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", onLoginSubmit);
  $("logout").addEventListener("click", logout);
  $("banner-close").addEventListener("click", hideBanner);
  $("create-room-form").addEventListener("submit", onCreateRoom);
  $("invite-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const user = $("invite-user").value.trim();
    if (user) invite(user).then(() => ($("invite-user").value = ""));
  });
  $("invite-bot").addEventListener("click", () => invite(botId()));
  $("join-conference").addEventListener("click", joinConference);
  $("leave-room").addEventListener("click", leaveRoom);
  $("answer").addEventListener("click", answerIncoming);
  $("decline").addEventListener("click", declineIncoming);
  $("hangup").addEventListener("click", () => state.call?.hangup());
  $("mute-mic").addEventListener("click", () => state.call?.setMicMuted(!state.call.micMuted));
  $("camera-off").addEventListener("click", () => state.call?.setCameraOff(!state.call.cameraOff));
  $("relay-only").addEventListener("change", (e) => store.set("relayOnly", e.target.checked ? "1" : "0"));
  window.addEventListener("beforeunload", () => state.call?.hangup());
}

async function boot() {
  wire();
  const saved = store.get("session");
  if (!saved) return showLogin();
  let client;
  try {
    client = new MatrixClient(JSON.parse(saved));
    await client.whoami();
  } catch (e) {
    showLogin();
    if (e instanceof MatrixError && e.errcode === "M_UNKNOWN_TOKEN") store.del("session");
    $("login-error").textContent = e instanceof MatrixError && e.errcode === "M_UNKNOWN_TOKEN" ? "Your session ended: log in again." : errorText(e);
    return;
  }
  start(client);
}

// For debugging in the console (and the browser tests): the current call.
window.switchboard = {
  get call() {
    return state.call;
  },
};

boot();
