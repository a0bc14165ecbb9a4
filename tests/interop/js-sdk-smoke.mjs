// matrix-js-sdk (the SDK of Element Web) against a Switchboard homeserver:
// register, log in, sync, create a room, invite, join on invite, exchange a
// message and a to-device message, fetch TURN credentials, paginate, log out.
// Usage: node js-sdk-smoke.mjs BASE_URL. Prints one JSON line; exits non-zero on failure.
import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

logger.setLevel("error");
// matrix-js-sdk 43 targets browsers and Node.js 22; the machines here have Node.js 20,
// which lacks only this one ES2024 helper the SDK uses.
Promise.withResolvers ??= function withResolvers() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
};
const baseUrl = process.argv[2];
if (!baseUrl) throw new Error("usage: node js-sdk-smoke.mjs BASE_URL");
const deadline = (ms, what) =>
  new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms));
const within = (promise, what, ms = 15000) => Promise.race([promise, deadline(ms, what)]);
const suffix = Math.random().toString(36).slice(2, 8);

async function register(name) {
  const client = sdk.createClient({ baseUrl });
  let response;
  try {
    response = await client.registerRequest({ username: name, password: "pw-" + name });
  } catch (err) {
    // User-interactive auth: the server offers m.login.dummy with a session.
    if (err.httpStatus !== 401 || !err.data?.flows) throw err;
    response = await client.registerRequest({
      username: name,
      password: "pw-" + name,
      auth: { type: "m.login.dummy", session: err.data.session },
    });
  }
  // Log in again with the password, as Element does after registering.
  const login = sdk.createClient({ baseUrl });
  const creds = await login.loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: name },
    password: "pw-" + name,
  });
  if (creds.user_id !== response.user_id) throw new Error("login returned another user");
  return sdk.createClient({ baseUrl, userId: creds.user_id, accessToken: creds.access_token, deviceId: creds.device_id });
}

async function started(client) {
  const ready = new Promise((resolve, reject) => {
    client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
      if (state === "PREPARED") resolve();
      if (state === "ERROR") reject(data?.error ?? new Error("sync error"));
    });
  });
  await client.startClient({ initialSyncLimit: 10 });
  await within(ready, "initial sync");
}

const result = {};
const alice = await register("alice" + suffix);
const bob = await register("bob" + suffix);
await started(alice);
await started(bob);

// Bob joins whatever he is invited to.
const bobJoined = new Promise((resolve) => {
  bob.on(sdk.RoomMemberEvent.Membership, async (_event, member) => {
    if (member.userId === bob.getUserId() && member.membership === "invite") {
      await bob.joinRoom(member.roomId);
      resolve(member.roomId);
    }
  });
});
const { room_id: roomId } = await alice.createRoom({ name: "interop", invite: [bob.getUserId()], preset: "private_chat" });
result.joined = (await within(bobJoined, "bob joins on invite")) === roomId;

// A message from Alice reaches Bob's timeline through /sync.
const bobGot = new Promise((resolve) => {
  bob.on(sdk.RoomEvent.Timeline, (event, room) => {
    if (room?.roomId === roomId && event.getType() === "m.room.message" && event.getContent().body === "hello bob") {
      resolve(event.getSender());
    }
  });
});
await alice.sendTextMessage(roomId, "hello bob");
result.message = (await within(bobGot, "message delivery")) === alice.getUserId();

// To-device, as call events travel in group calls.
const aliceGot = new Promise((resolve) => {
  alice.on(sdk.ClientEvent.ToDeviceEvent, (event) => {
    if (event.getType() === "org.switchboard.ping") resolve(event.getContent().n);
  });
});
const contentMap = new Map([[alice.getUserId(), new Map([[alice.getDeviceId(), { n: 42 }]])]]);
await bob.sendToDevice("org.switchboard.ping", contentMap);
result.toDevice = (await within(aliceGot, "to-device delivery")) === 42;

// TURN credentials and history.
const turn = await alice.turnServer();
result.turn = typeof turn === "object";
const room = alice.getRoom(roomId);
await alice.scrollback(room, 30);
result.history = room.getLiveTimeline().getEvents().some((e) => e.getType() === "m.room.create");
result.members = (await alice.getJoinedRoomMembers(roomId)).joined[bob.getUserId()] !== undefined;
await alice.setDisplayName("Alice Interop");
result.profile = (await bob.getProfileInfo(alice.getUserId())).displayname === "Alice Interop";

alice.stopClient();
bob.stopClient();
await alice.logout(true);
console.log(JSON.stringify(result));
const failed = Object.entries(result).filter(([, ok]) => ok !== true);
if (failed.length > 0) {
  console.error("failed checks:", failed.map(([k]) => k).join(", "));
  process.exit(1);
}
process.exit(0);
