// Browser end-to-end scenarios for the web demo: Debian's Chromium (headless,
// fake camera and microphone) driven by playwright-core against the real
// all-in-one `switchboard` binary. tests/web_e2e.rs runs this inside a
// loopback-only network namespace, so every ICE candidate is on 127.0.0.1.
//
// usage: node web-e2e.mjs SWITCHBOARD_BINARY OUTPUT_DIR [SCENARIO...]
// Prints one JSON line at the end: {scenario: "ok" | "failure message"}.

import { chromium } from "playwright-core";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import dgram from "node:dgram";

const [binary, outDir, ...only] = process.argv.slice(2);
const ALL = [
  "one-to-one",
  "declined",
  "relay-unavailable",
  "ice-failed",
  "unreachable",
  "camera-denied",
  "conference",
  "lossy-conference",
  "simulcast-added",
  "js-sdk-conference",
];
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const BOT = "@conference:localhost";
mkdirSync(outDir, { recursive: true });

const log = (...args) => console.log(new Date().toISOString().slice(11, 23), ...args);

/** Polls `probe` until it returns a truthy value; fails after `ms` with `what`
 * (at once if the probe throws an error marked `fatal`). */
async function until(what, probe, ms = 30000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      if (e.fatal) throw e;
      last = e.message;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * Does this binary embed the TURN relay? Read from its effective config (the
 * relay's listener keys), so the relay-only scenario runs as soon as the relay
 * is part of the build, and the other scenarios can turn it off.
 */
function hasTurnRelay() {
  const out = spawnSync(binary, ["--print-config"], { encoding: "utf8" });
  if (out.status !== 0) throw new Error(`switchboard --print-config failed: ${out.stderr}`);
  const turn = out.stdout.split("\n[").find((section) => section.startsWith("turn]"));
  return !!turn && turn.includes("\nlistening_port = ");
}
const TURN_RELAY = hasTurnRelay();

/** Server flags: with our TURN relay on a free port, or without any relay. */
function turnArgs(relay) {
  if (!TURN_RELAY) return [];
  return relay ? ["--set", "turn.listening_port=0"] : ["--set", "turn.enabled=false"];
}

async function startServer(extra = []) {
  const dataDir = mkdtempSync(join(tmpdir(), "switchboard-web-e2e-"));
  const child = spawn(binary, ["--data-dir", dataDir, "--bind", "127.0.0.1:0", "--set", "media.shards=1", ...extra], {
    // The bot's joins at info: a slow one (seen once) then shows in a failure's output.
    env: { ...process.env, SWITCHBOARD_LOG_LEVEL: process.env.SWITCHBOARD_LOG_LEVEL || "warn,switchboard::bot=info" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = createInterface({ input: child.stdout });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("switchboard did not print its web demo URL within 30 s")), 30000);
    child.on("exit", (code) => reject(new Error(`switchboard exited (${code}) before printing its URL`)));
    lines.on("line", (line) => {
      const m = line.match(/Web demo[^:]*: (http\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1].replace("localhost", "127.0.0.1"));
      }
    });
  });
  return { url, stop: () => child.kill("SIGTERM"), dataDir };
}

function launch(extra = []) {
  const fakeUi = extra.some((a) => a.startsWith("--use-fake-ui-for-media-stream"));
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    chromiumSandbox: false,
    args: [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-device-for-media-stream",
      ...(fakeUi ? [] : ["--use-fake-ui-for-media-stream"]),
      ...extra,
      "--autoplay-policy=no-user-gesture-required",
      // The namespace has only `lo`: let WebRTC use it, with raw addresses.
      "--allow-loopback-in-peer-connection",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
    ],
  });
}

class User {
  constructor(name, page) {
    this.name = name;
    this.id = `@${name}:localhost`;
    this.page = page;
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") log(`[${name} console.${m.type()}]`, m.text());
    });
    page.on("pageerror", (e) => log(`[${name} page error]`, e.message));
  }

  static async open(browser, url, name) {
    const context = await browser.newContext({ viewport: { width: 1200, height: 860 } });
    const page = await context.newPage();
    await page.goto(`${url}?lowres`);
    return new User(name, page);
  }

  async register() {
    const p = this.page;
    await p.fill("#username", this.name);
    await p.fill("#password", "correct horse battery");
    await p.click("#register-button");
    await p.locator("#whoami", { hasText: this.id }).waitFor({ timeout: 20000 });
  }

  async createRoom(name, invite, withBot = false) {
    const p = this.page;
    await p.fill("#new-room-name", name);
    await p.fill("#new-room-invite", invite.join(", "));
    if (withBot) await p.check("#new-room-bot");
    await p.click("#create-room-form button[type=submit]");
    await p.locator("#room-name", { hasText: name }).waitFor({ timeout: 15000 });
  }

  async acceptInvite(roomName) {
    const li = this.page.locator("#invites li", { hasText: roomName });
    await li.getByRole("button", { name: /^Join/ }).click({ timeout: 20000 });
    await this.page.locator("#room-name", { hasText: roomName }).waitFor({ timeout: 15000 });
  }

  async status() {
    return (await this.page.locator("#call-status").textContent())?.trim();
  }

  async waitConnected() {
    await until(`${this.name}'s call to be connected`, async () => (await this.status()) === "Connected", 40000);
  }

  bytesIn() {
    return this.page.locator("#stat-bytes-in").getAttribute("data-value").then(Number);
  }

  /** The stats panel's received byte count grows by at least `by` bytes. */
  async inboundGrows(by = 20000) {
    const start = await until(`${this.name} to receive media`, async () => (await this.bytesIn()) > 0 && (await this.bytesIn()), 30000);
    await until(`${this.name}'s inbound bytes to grow past ${start + by}`, async () => (await this.bytesIn()) > start + by, 30000);
  }

  /** The selected candidate pair, as the stats panel shows it. */
  async pair() {
    const dd = this.page.locator("#stat-pair");
    return {
      localType: await dd.getAttribute("data-local-type"),
      remoteType: await dd.getAttribute("data-remote-type"),
      localAddress: await dd.getAttribute("data-local-address"),
      remoteAddress: await dd.getAttribute("data-remote-address"),
    };
  }

  async assertLoopbackPair() {
    const pair = await until(`${this.name}'s selected candidate pair`, async () => {
      const p = await this.pair();
      return p.localAddress ? p : null;
    });
    if (pair.localAddress !== "127.0.0.1" || pair.remoteAddress !== "127.0.0.1") {
      throw new Error(`${this.name}'s selected pair is not on loopback: ${JSON.stringify(pair)}`);
    }
    return pair;
  }

  /** Remote tiles: [{userId, bytes}]. */
  remoteTiles() {
    return this.page.$$eval("#tiles > .tile.remote", (nodes) =>
      nodes.map((n) => ({
        userId: n.dataset.userId,
        bytes: Number(n.dataset.bytes || 0),
        audioPackets: Number(n.dataset.audioPackets || 0),
        name: n.querySelector(".name")?.textContent,
      })),
    );
  }

  /** Waits until the remote tiles are exactly `users` and each one's bytes grow. */
  async seesTiles(users) {
    const want = [...users].sort().join(",");
    await until(`${this.name} to see tiles of ${want}`, async () => {
      const tiles = await this.remoteTiles();
      return tiles.map((t) => t.userId).sort().join(",") === want;
    }, 45000);
    const tiles = await this.remoteTiles();
    for (const t of tiles) {
      if (!t.name.includes(t.userId)) throw new Error(`${this.name}'s tile for ${t.userId} is labelled ${t.name}`);
    }
    const before = new Map(tiles.map((t) => [t.userId, t.bytes]));
    await until(`${this.name}'s inbound bytes from each of ${want} to grow`, async () => {
      const now = await this.remoteTiles();
      return now.length === users.length && now.every((t) => t.bytes > (before.get(t.userId) || 0) + 5000);
    }, 40000);
  }

  /** Each remote tile's received audio packets grow by 100 (two seconds of opus). */
  async hearsEachTile() {
    const before = new Map((await this.remoteTiles()).map((t) => [t.userId, t.audioPackets]));
    await until(`${this.name}'s audio packets from each tile to grow`, async () => {
      const now = await this.remoteTiles();
      return now.every((t) => t.audioPackets > (before.get(t.userId) || 0) + 100);
    }, 20000);
  }

  /** Frames decoded per received video stream (inbound-rtp, by SSRC). */
  videoFrames() {
    return this.page.evaluate(async () => {
      const stats = await window.switchboard.call.pc.getStats();
      const video = [...stats.values()].filter((s) => s.type === "inbound-rtp" && s.kind === "video");
      return Object.fromEntries(video.map((s) => [s.ssrc, s.framesDecoded || 0]));
    });
  }

  /** At least `streams` received video streams each decode 30 more frames. */
  async decodesVideo(streams) {
    const before = await this.videoFrames();
    await until(`${this.name} to decode ${streams} video streams`, async () => {
      const now = Object.entries(await this.videoFrames());
      return now.filter(([ssrc, frames]) => frames > (before[ssrc] || 0) + 30).length >= streams;
    }, 30000);
  }

  async bannerText() {
    const banner = this.page.locator("#banner");
    return (await banner.isVisible()) ? (await banner.textContent()).trim() : "";
  }

  async waitBanner(re, what, ms = 30000) {
    return until(`${this.name} to show ${what}`, async () => {
      const text = await this.bannerText();
      return re.test(text) && text;
    }, ms);
  }

  async callViewHidden() {
    return this.page.locator("#call-view").isHidden();
  }

  shot(scenario) {
    return this.page.screenshot({ path: join(outDir, `${scenario}-${this.name}.png`), fullPage: true });
  }
}

// ---- scenarios ---------------------------------------------------------------

async function oneToOne(ctx) {
  const [alice, bob] = await ctx.users("alice", "bob");
  await alice.createRoom("Alice and Bob", [bob.id]);
  await bob.acceptInvite("Alice and Bob");
  await alice.page.getByRole("button", { name: `Video call ${bob.id}` }).click({ timeout: 20000 });
  await bob.page.locator("#incoming", { hasText: alice.id }).waitFor({ timeout: 20000 });
  await bob.page.click("#answer");
  await Promise.all([alice.waitConnected(), bob.waitConnected()]);
  await Promise.all([alice.inboundGrows(), bob.inboundGrows()]);
  for (const [me, other] of [
    [alice, bob],
    [bob, alice],
  ]) {
    const pair = await me.assertLoopbackPair();
    log(`${me.name} pair`, JSON.stringify(pair));
    const tiles = await me.remoteTiles();
    if (tiles.length !== 1 || tiles[0].userId !== other.id) throw new Error(`${me.name} shows tiles ${JSON.stringify(tiles)}`);
  }
  await alice.shot("one-to-one");
  // Bob looks at the call on a phone-sized window.
  await bob.page.setViewportSize({ width: 390, height: 844 });
  await bob.shot("one-to-one-phone");
  await bob.page.setViewportSize({ width: 1200, height: 860 });
  await alice.page.click("#hangup");
  await bob.waitBanner(/hung up/, "that alice hung up");
  await until("both call views to close", async () => (await alice.callViewHidden()) && (await bob.callViewHidden()));
}

async function declined(ctx) {
  const [alice, bob] = await ctx.users("alice", "bob");
  await alice.page.getByRole("button", { name: `Video call ${bob.id}` }).click({ timeout: 20000 });
  await bob.page.locator("#incoming", { hasText: alice.id }).waitFor({ timeout: 20000 });
  await bob.page.click("#decline");
  await alice.waitBanner(/declined the call/, "the declined message");
  await until("alice's call view to close", () => alice.callViewHidden());
  await alice.shot("declined");
  // A reload keeps the session and finds the room again from the initial sync.
  await bob.page.reload();
  await bob.page.locator("#whoami", { hasText: bob.id }).waitFor({ timeout: 20000 });
  await bob.page.locator("#room-list button", { hasText: "Alice and Bob" }).waitFor({ timeout: 20000 });
}

async function relayOnly(ctx) {
  // Both sides force relayed candidates: the media goes through our TURN relay.
  const [alice, bob] = await ctx.users("alice", "bob");
  await alice.page.check("#relay-only");
  await bob.page.check("#relay-only");
  await alice.page.getByRole("button", { name: `Video call ${bob.id}` }).click({ timeout: 20000 });
  await bob.page.locator("#incoming", { hasText: alice.id }).waitFor({ timeout: 20000 });
  await bob.page.click("#answer");
  await Promise.all([alice.waitConnected(), bob.waitConnected()]);
  await Promise.all([alice.inboundGrows(), bob.inboundGrows()]);
  for (const user of [alice, bob]) {
    const pair = await user.assertLoopbackPair();
    log(`${user.name} pair`, JSON.stringify(pair));
    if (pair.localType !== "relay" || pair.remoteType !== "relay") {
      throw new Error(`${user.name}'s selected pair is not relay ↔ relay: ${JSON.stringify(pair)}`);
    }
  }
  await Promise.all([alice.shot("relay-only"), bob.shot("relay-only")]);
  await alice.page.click("#hangup");
  await until("both call views to close", async () => (await alice.callViewHidden()) && (await bob.callViewHidden()));
  await alice.page.uncheck("#relay-only");
  await bob.page.uncheck("#relay-only");
}

async function relayUnavailable(ctx) {
  // A server without any TURN server: "Relay only" cannot work, and the demo says so.
  const server = await startServer(turnArgs(false));
  try {
    const judy = await User.open(ctx.browser, server.url, "judy");
    const ken = await User.open(ctx.browser, server.url, "ken");
    await judy.register();
    await ken.register();
    await judy.createRoom("Judy and Ken", [ken.id]);
    await ken.acceptInvite("Judy and Ken");
    await judy.page.check("#relay-only");
    await judy.page.getByRole("button", { name: `Video call ${ken.id}` }).click({ timeout: 20000 });
    await judy.waitBanner(/Relay only.*needs a TURN server/, "the relay-unavailable message");
    await judy.shot("relay-unavailable");
    await Promise.all([judy.page.context().close(), ken.page.context().close()]);
  } finally {
    server.stop();
    rmSync(server.dataDir, { recursive: true, force: true });
  }
}

async function cameraDenied(ctx) {
  // A second browser whose (fake) permission prompt answers "deny".
  const browser = await launch(["--use-fake-ui-for-media-stream=deny"]);
  try {
    const grace = await User.open(browser, ctx.url, "grace");
    await grace.register();
    await grace.createRoom("Grace alone", [], true);
    await grace.page.click("#join-conference");
    await grace.waitBanner(/Camera and microphone access was denied/, "the permission message");
    await grace.shot("camera-denied");
  } finally {
    await browser.close();
  }
}

async function iceFailed(ctx) {
  // A second server whose /voip/turnServer names a TURN server nobody runs: with
  // "Relay only" the caller has no candidate at all, so ICE cannot succeed even
  // though both are on loopback, and the caller says so.
  const server = await startServer([...turnArgs(false), "--set", 'turn.uris=["turn:127.0.0.1:59998?transport=udp"]']);
  try {
    const heidi = await User.open(ctx.browser, server.url, "heidi");
    const ivan = await User.open(ctx.browser, server.url, "ivan");
    await heidi.register();
    await ivan.register();
    await heidi.createRoom("Heidi and Ivan", [ivan.id]);
    await ivan.acceptInvite("Heidi and Ivan");
    await heidi.page.check("#relay-only");
    await heidi.page.getByRole("button", { name: `Voice call ${ivan.id}` }).click({ timeout: 20000 });
    await ivan.page.locator("#incoming", { hasText: heidi.id }).waitFor({ timeout: 20000 });
    await ivan.page.click("#answer");
    await heidi.waitBanner(/ICE failed/, "the ICE-failed message", 60000);
    // Ivan's side fails too: by its own ICE timeout or by heidi's hangup (ice_failed).
    await ivan.waitBanner(/ICE failed/, "the ICE-failed message");
    await heidi.shot("ice-failed");
    await Promise.all([heidi.page.context().close(), ivan.page.context().close()]);
  } finally {
    server.stop();
    rmSync(server.dataDir, { recursive: true, force: true });
  }
}

async function unreachable(ctx) {
  const page = (await (await ctx.browser.newContext()).newPage());
  const user = new User("nobody", page);
  await page.goto(`${ctx.url}?lowres`);
  // Nothing listens on this port in the namespace (the test made it; only switchboard runs).
  await page.fill("#hs-url", "http://127.0.0.1:59999");
  await page.fill("#username", "nobody");
  await page.fill("#password", "irrelevant");
  await page.click("#login-button");
  await until("the unreachable-homeserver message", async () =>
    /Cannot reach the homeserver at http:\/\/127\.0\.0\.1:59999/.test(await page.locator("#login-error").textContent()),
  );
  await user.shot("unreachable");
}

async function conference(ctx) {
  const [carol, dave, erin, frank] = await ctx.users("carol", "dave", "erin", "frank");
  await carol.createRoom("Standup", [dave.id, erin.id, frank.id], true);
  for (const u of [dave, erin, frank]) await u.acceptInvite("Standup");
  const first = [carol, dave, erin];
  for (const u of first) await u.page.click("#join-conference");
  const ids = (users) => users.map((u) => u.id);
  await Promise.all(first.map((u) => u.waitConnected()));
  await Promise.all(first.map((u) => u.seesTiles(ids(first.filter((o) => o !== u)))));
  log("three in the conference: each sees two");
  // Carol mutes her microphone and camera: the others see it on her tile.
  await carol.page.click("#mute-mic");
  await carol.page.click("#camera-off");
  const carolsTile = (u) => u.page.locator(`#tiles > .tile.remote[data-user-id="${carol.id}"] .name`);
  for (const u of [dave, erin]) {
    await until(`${u.name} to see carol muted`, async () => /microphone off, camera off/.test(await carolsTile(u).textContent()));
  }
  await carol.page.click("#mute-mic");
  await carol.page.click("#camera-off");
  for (const u of [dave, erin]) {
    await until(`${u.name} to see carol unmuted`, async () => !/off/.test(await carolsTile(u).textContent()));
  }
  log("mute and unmute reached the others");
  await frank.page.click("#join-conference");
  const all = [...first, frank];
  await frank.waitConnected();
  await Promise.all(all.map((u) => u.seesTiles(ids(all.filter((o) => o !== u)))));
  log("four in the conference: each sees three");
  // The SFU seals forwarded media itself (sfu/src/srtp.rs): Chrome decrypts
  // it (packets that fail SRTP authentication never reach packetsReceived),
  // and the server says it sealed them.
  await Promise.all(all.map((u) => u.hearsEachTile()));
  const sealed = await until("the SFU to report sealed audio", async () => {
    const text = await (await fetch(`${new URL(ctx.url).origin}/metrics`)).text();
    const m = text.match(/^switchboard_sfu_packets_sealed_total(?:\{[^}]*\})? (\d+)/m);
    return m && Number(m[1]) > 500 && Number(m[1]);
  });
  // Video too is sealed by the SFU (no simulcast in this room): Chrome decodes it.
  await Promise.all(all.map((u) => u.decodesVideo(all.length - 1)));
  // The SFU opens what the browsers send (sfu/src/ingress.rs) and sends their
  // transport-wide feedback: Chrome's own uplink estimate lives on it, and
  // climbs past its 300 kbps start only with it.
  for (const u of all) {
    let seen;
    await until(`${u.name}'s uplink estimate to climb on the SFU's transport-wide feedback`, async () => {
      seen = await u.page.evaluate(async () => {
        const stats = await window.switchboard.call.pc.getStats();
        const pair = [...stats.values()].find((s) => s.type === "candidate-pair" && s.nominated && s.state === "succeeded");
        return pair?.availableOutgoingBitrate || 0;
      });
      return seen > 600000;
    }, 30000).catch(async (e) => {
      // What the browser sends, and what the SFU's reports said of it.
      const sending = await u.page.evaluate(async () => {
        const stats = await window.switchboard.call.pc.getStats();
        return [...stats.values()]
          .filter((s) => s.type === "outbound-rtp" || s.type === "remote-inbound-rtp")
          .map(({ type, kind, targetBitrate, qualityLimitationReason, packetsSent, packetsLost, fractionLost }) =>
            ({ type, kind, targetBitrate, qualityLimitationReason, packetsSent, packetsLost, fractionLost }));
      });
      throw new Error(`${e.message}: ${seen} bps; ${JSON.stringify(sending)}`);
    });
    log(`${u.name}'s uplink estimate: ${Math.round(seen / 1000)} kbps`);
  }
  log(`audio and video reach each from each; the SFU sealed ${sealed} packets itself`);
  await frank.assertLoopbackPair();
  await Promise.all(all.map((u) => u.shot("conference-four")));
  const transceivers = (u) => u.page.evaluate(() => window.switchboard.call.pc.getTransceivers().length);
  const withFrank = await transceivers(carol);
  await frank.page.click("#hangup");
  await Promise.all(first.map((u) => u.seesTiles(ids(first.filter((o) => o !== u)))));
  log("frank left: each sees two again");
  await carol.shot("conference-after-leave");
  // Frank comes back asking for one mixed stream: a single tile from the bot
  // (everyone else's voices mixed, the speaker's video) whose bytes grow, while
  // the others see him as usual.
  await frank.page.check("#single-stream");
  await frank.page.click("#join-conference");
  await frank.waitConnected();
  await until("frank to receive one mixed stream", async () => {
    const tiles = await frank.remoteTiles();
    return tiles.length === 1 && /Conference mix/.test(tiles[0].name) && tiles[0].bytes > 20000;
  }, 45000);
  await Promise.all(first.map((u) => u.seesTiles(ids(all.filter((o) => o !== u)))));
  // His new tracks came on the m-lines his old ones left (relabelled), not on new ones.
  const rejoined = await transceivers(carol);
  if (rejoined !== withFrank) throw new Error(`carol has ${rejoined} transceivers after frank came back, ${withFrank} before he left`);
  log(`frank on one mixed stream: one tile for him, the others see him (carol still has ${rejoined} transceivers)`);
  await frank.shot("conference-single-stream");
  await frank.page.click("#hangup");
  await frank.page.uncheck("#single-stream");
}

/** A free UDP port on 127.0.0.1. */
async function freeUdpPort() {
  const socket = dgram.createSocket("udp4");
  await new Promise((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const { port } = socket.address();
  await new Promise((resolve) => socket.close(resolve));
  return port;
}

/**
 * A lossy NAT in front of the SFU: it listens on `front` (the address the SFU
 * advertises), gives each browser address a socket of its own towards the
 * SFU at `back`, and drops every `every`-th RTP packet (RFC 5761: not RTCP)
 * that is not opus (PT 111) on its way from the SFU to a browser: 1/every of
 * the forwarded video, never STUN, DTLS or RTCP.
 */
async function lossyNat(front, back, every) {
  const outside = dgram.createSocket("udp4");
  const inside = new Map();
  const counts = { video: 0, dropped: 0, upstream: 0, droppedUpstream: 0 };
  const isVideo = (d) => d.length > 12 && d[0] >> 6 === 2 && !(d[1] >= 192 && d[1] <= 223) && (d[1] & 0x7f) !== 111;
  outside.on("message", (datagram, from) => {
    if (isVideo(datagram) && ++counts.upstream % every === 0) {
      counts.droppedUpstream += 1;
      return;
    }
    const key = `${from.address}:${from.port}`;
    let socket = inside.get(key);
    if (!socket) {
      socket = dgram.createSocket("udp4");
      socket.on("message", (reply) => {
        if (isVideo(reply) && ++counts.video % every === 0) {
          counts.dropped += 1;
          return;
        }
        outside.send(reply, from.port, from.address);
      });
      socket.bind(0, "127.0.0.1");
      inside.set(key, socket);
    }
    socket.send(datagram, back.port, back.address);
  });
  await new Promise((resolve) => outside.bind(front.port, front.address, resolve));
  return {
    counts,
    close() {
      outside.close();
      for (const socket of inside.values()) socket.close();
    },
  };
}

/**
 * A conference through a lossy network: the SFU advertises 127.0.0.2, where a
 * NAT of ours drops 5 % of the video both ways. Chrome asks for what the SFU
 * sent and was lost (RTCP NACK, in SRTCP) and the SFU, which seals this video
 * itself, resends it from its own history (sfu/src/nack.rs); the SFU asks
 * the publishing Chrome for what it sent and was lost (sfu/src/ingress.rs),
 * and restores Chrome's retransmissions (RTX). What stays lost is a small
 * part of what was dropped.
 */
async function lossyConference(ctx) {
  const port = await freeUdpPort();
  const nat = await lossyNat({ address: "127.0.0.2", port }, { address: "127.0.0.1", port }, 20);
  const server = await startServer([
    ...turnArgs(false),
    "--set", `media.bind=127.0.0.1:${port}`,
    "--set", "media.advertised_ip=127.0.0.2",
  ]);
  const users = [];
  try {
    for (const name of ["gina", "hank"]) {
      const user = await User.open(ctx.browser, server.url, name);
      users.push(user);
      await user.register();
    }
    const [gina, hank] = users;
    await gina.createRoom("Lossy", [hank.id], true);
    await hank.acceptInvite("Lossy");
    for (const u of users) await u.page.click("#join-conference");
    await Promise.all(users.map((u) => u.waitConnected()));
    await gina.seesTiles([hank.id]);
    await hank.seesTiles([gina.id]);
    const video = (u) =>
      u.page.evaluate(async () => {
        const stats = await window.switchboard.call.pc.getStats();
        const rtp = [...stats.values()].filter((s) => s.type === "inbound-rtp" && s.kind === "video");
        const sum = (key) => rtp.reduce((n, s) => n + (s[key] || 0), 0);
        const sent = [...stats.values()].filter((s) => s.type === "outbound-rtp" && s.kind === "video");
        const sumSent = (key) => sent.reduce((n, s) => n + (s[key] || 0), 0);
        return {
          received: sum("packetsReceived"),
          lost: sum("packetsLost"),
          nacks: sum("nackCount"),
          nacked: sumSent("nackCount"),
          resent: sumSent("retransmittedPacketsSent"),
        };
      });
    const snapshot = async () => {
      const seen = await Promise.all(users.map(video));
      const metrics = await (await fetch(`${new URL(server.url).origin}/metrics`)).text();
      const resent = Number(metrics.match(/^switchboard_sfu_packets_resent_total(?:\{[^}]*\})? (\d+)/m)?.[1] || 0);
      return { ...nat.counts, resent, lost: seen.reduce((n, v) => n + v.lost, 0), seen };
    };
    // Once 30 were dropped, each browser has asked again (NACK), the SFU has
    // resent at least half of what was dropped and the browsers miss under a
    // quarter of it (the last drops take a few round trips to come back).
    let last;
    await until("NACKs answered by the SFU's resends", async () => {
      last = await snapshot();
      const { dropped, droppedUpstream, resent, lost, seen } = last;
      const upstream = seen.reduce((n, v) => n + v.resent, 0);
      return (
        dropped >= 30 &&
        droppedUpstream >= 30 &&
        seen.every((v) => v.nacks > 0 && v.nacked > 0) &&
        resent >= dropped / 2 &&
        upstream >= droppedUpstream / 2 &&
        lost <= (dropped + droppedUpstream) / 4
      );
    }, 60000).catch((e) => {
      throw new Error(`${e.message}: ${JSON.stringify(last)}`);
    });
    log(
      `the NAT dropped ${last.dropped} of ${last.video} video packets to the browsers and ${last.droppedUpstream} of ` +
        `${last.upstream} from them; browsers: ${JSON.stringify(last.seen)}; the SFU resent ${last.resent}`,
    );
    await Promise.all(users.map((u) => u.shot("lossy-conference")));
    for (const u of users) await u.page.click("#hangup");
  } finally {
    for (const u of users) await u.page.context().close().catch(() => {});
    server.stop();
    nat.close();
    rmSync(server.dataDir, { recursive: true, force: true });
  }
}

/**
 * A caller in a conference without simulcast adds a video track sent as two
 * simulcast layers (rids "h" and "l"), offering it in `m.call.negotiate`. Her
 * session's media is opened by the SFU itself (sfu/src/ingress.rs): each
 * layer's SSRC must be known by its rid, so the other gets one layer at a time
 * as one stream (Chrome decodes it and counts few losses; forwarded as one
 * stream of interleaved layers it counted thousands).
 */
async function simulcastAdded(ctx) {
  const [ivy, jack] = await ctx.users("ivy", "jack");
  await ivy.createRoom("Layers", [jack.id], true);
  await jack.acceptInvite("Layers");
  for (const u of [ivy, jack]) await u.page.click("#join-conference");
  await Promise.all([ivy, jack].map((u) => u.waitConnected()));
  await ivy.seesTiles([jack.id]);
  await jack.seesTiles([ivy.id]);
  await jack.decodesVideo(1);
  const offered = await ivy.page.evaluate(async () => {
    const call = window.switchboard.call;
    const pc = call.pc;
    // A 1280×720 source (the fake camera's is too small for Chrome to send
    // a second layer), drawn 30 times a second.
    const canvas = Object.assign(document.createElement("canvas"), { width: 1280, height: 720 });
    const draw = canvas.getContext("2d");
    let frame = 0;
    window.simulcastSource = setInterval(() => {
      frame += 1;
      draw.fillStyle = `hsl(${(frame * 7) % 360}, 80%, 50%)`;
      draw.fillRect(0, 0, 1280, 720);
      draw.fillStyle = "#fff";
      draw.fillRect((frame * 16) % 1280, 200, 160, 320);
    }, 33);
    const track = canvas.captureStream(30).getVideoTracks()[0];
    pc.addTransceiver(track, {
      direction: "sendonly",
      streams: [new MediaStream([track])],
      sendEncodings: [{ rid: "h" }, { rid: "l", scaleResolutionDownBy: 2 }],
    });
    await pc.setLocalDescription(await pc.createOffer());
    const sdp = pc.localDescription.sdp;
    await call.send("m.call.negotiate", {
      description: { type: "offer", sdp },
      lifetime: 10000,
      sdp_stream_metadata: call.ownMetadata(),
    });
    return { simulcast: /a=simulcast:send h;l/.test(sdp), rids: (sdp.match(/a=rid:/g) || []).length };
  });
  if (!offered.simulcast) throw new Error(`Chrome offered no simulcast: ${JSON.stringify(offered)}`);
  await until("ivy to take the SFU's answer", () =>
    ivy.page.evaluate(() => window.switchboard.call.pc.signalingState === "stable"),
  );
  const layers = () =>
    ivy.page.evaluate(async () => {
      const stats = await window.switchboard.call.pc.getStats();
      return [...stats.values()]
        .filter((s) => s.type === "outbound-rtp" && s.kind === "video" && s.rid)
        .map((s) => ({ rid: s.rid, sent: s.packetsSent, width: s.frameWidth }));
    });
  let sending;
  await until("ivy to send both layers", async () => (sending = await layers()).filter((l) => l.sent > 50).length === 2)
    .catch((e) => {
      throw new Error(`${e.message}: ${JSON.stringify(sending)}`);
    });
  // Jack gets a second video stream from her, and decodes both.
  await jack.decodesVideo(2);
  const received = () =>
    jack.page.evaluate(async () => {
      const stats = await window.switchboard.call.pc.getStats();
      return [...stats.values()]
        .filter((s) => s.type === "inbound-rtp" && s.kind === "video")
        .map((s) => ({ ssrc: s.ssrc, received: s.packetsReceived, lost: s.packetsLost, frames: s.framesDecoded, width: s.frameWidth }));
    });
  const before = await received();
  await until("jack to decode 60 more frames of each", async () => {
    const now = await received();
    return now.length >= 2 && now.every((s) => s.frames > (before.find((b) => b.ssrc === s.ssrc)?.frames || 0) + 60);
  });
  const after = await received();
  for (const s of after) {
    if (s.lost > Math.max(20, s.received / 20)) {
      throw new Error(`jack lost ${s.lost} of ${s.received} video packets of one stream: ${JSON.stringify(after)}`);
    }
  }
  const metrics = await (await fetch(`${new URL(ctx.url).origin}/metrics`)).text();
  const opened = Number(metrics.match(/^switchboard_sfu_packets_opened_total(?:\{[^}]*\})? (\d+)/m)?.[1] || 0);
  if (opened === 0) throw new Error("the SFU opened nothing itself");
  // The layer not forwarded is skipped as another layer's, not dropped as a
  // late packet of the one forwarded (as when both were taken for one stream).
  const late = [...metrics.matchAll(/^switchboard_sfu_drops_total\{[^}]*reason="before_switch"[^}]*\} (\d+)/gm)]
    .reduce((n, m) => n + Number(m[1]), 0);
  if (late > 50) throw new Error(`the SFU dropped ${late} packets as from before a layer switch`);
  log(
    `ivy sends ${JSON.stringify(await layers())}; jack decodes ${JSON.stringify(after)}; ` +
      `the SFU opened ${opened} packets, dropped ${late} as from before a switch`,
  );
  await Promise.all([ivy, jack].map((u) => u.shot("simulcast-added")));
  for (const u of [ivy, jack]) await u.page.click("#hangup");
}

/**
 * matrix-js-sdk's own call implementation (`MatrixCall`, Element Web's legacy
 * calls) in two pages, bundled from tests/interop/js-sdk-call.mjs: both call
 * the conference bot in one room, reach "connected", and each gets the other's
 * stream as a remote feed (the bot's renegotiation and its
 * `sdp_stream_metadata` as matrix-js-sdk reads them), with media flowing.
 */
async function jsSdkConference(ctx) {
  const interop = join(dirname(fileURLToPath(import.meta.url)), "../interop");
  const esbuild = await import(join(interop, "node_modules/esbuild/lib/main.js"));
  const bundle = await (esbuild.default ?? esbuild).build({
    entryPoints: [join(interop, "js-sdk-call.mjs")],
    bundle: true,
    format: "iife",
    platform: "browser",
    target: "chrome120",
    write: false,
    logLevel: "warning",
  });
  const script = bundle.outputFiles[0].text;
  // A browser of its own: the earlier scenarios' pages may still hold the
  // fake camera, and matrix-js-sdk ends a call whose getUserMedia fails.
  const browser = await launch();
  try {
    await jsSdkCalls(ctx, browser, script);
  } finally {
    await browser.close();
  }
}

/**
 * Amy shares her screen in a multi-stream conference: Chrome's addTrack takes
 * one of the SFU's receive-only m-lines for it (a transceiver that never
 * sent). Ben gets a second feed from her, labelled m.screenshare, with bytes
 * arriving; Amy keeps exactly Ben's camera feed (the m-line she reused still
 * carries it, under its label).
 */
async function screenShare(amy, ben, status) {
  const before = await status(amy);
  const shared = await amy.page.evaluate(() => window.jsSdk.shareScreen());
  log("amy shares her screen:", JSON.stringify(shared));
  if (!shared.reused) throw new Error("Chrome did not reuse a transceiver for the screen share (the case under test)");
  let seen;
  await until("ben to get amy's screen share as a second feed", async () => {
    const s = (seen = await status(ben));
    const screen = s.remoteFeeds.find((f) => f.purpose === "m.screenshare");
    return screen && screen.stream.endsWith(`-${shared.stream}`) && screen.video > 0 && s.remoteFeeds.length === 2;
  }, 30000).catch((e) => {
    throw new Error(`${e.message}; ben's call: ${JSON.stringify(seen)}`);
  });
  const start = (await status(ben)).bytesIn;
  await until("ben's bytes to keep growing with the screen share", async () => (await status(ben)).bytesIn > start + 20000);
  const after = await status(amy);
  if (after.remoteFeeds.length !== 1 || after.remoteFeeds[0].stream !== before.remoteFeeds[0].stream) {
    throw new Error(`amy's feeds changed with her screen share: ${JSON.stringify(before.remoteFeeds)} → ${JSON.stringify(after.remoteFeeds)}`);
  }
  log("ben sees amy's screen share; amy still sees ben's camera");
  // She stops: the SFU unpublishes it and ben's feed goes away.
  await amy.page.evaluate(() => window.jsSdk.stopScreenShare());
  await until("ben's screen-share feed from amy to end", async () => {
    const s = (seen = await status(ben));
    return s.remoteFeeds.length === 1 && s.remoteFeeds[0].purpose === "m.usermedia";
  }, 30000).catch((e) => {
    throw new Error(`${e.message}; ben's call: ${JSON.stringify(seen)}`);
  });
  const last = await status(amy);
  if (last.state !== "connected" || last.remoteFeeds.length !== 1) throw new Error(`amy after her screen share: ${JSON.stringify(last)}`);
  log("amy stopped sharing: ben's screen-share feed ended");
  // She shares again (matrix-js-sdk puts the new track on her screen-share
  // transceiver, which keeps its first msid): the SFU sends it to ben on the
  // m-line her first share left, and matrix-js-sdk makes it a new feed.
  const bensTransceivers = (await status(ben)).transceivers;
  await amy.page.evaluate(() => window.jsSdk.shareScreen());
  await until("ben to get amy's second screen share", async () => {
    const s = (seen = await status(ben));
    const screen = s.remoteFeeds.find((f) => f.purpose === "m.screenshare");
    return screen && screen.video > 0 && s.remoteFeeds.length === 2;
  }, 30000).catch((e) => {
    throw new Error(`${e.message}; ben's call: ${JSON.stringify(seen)}`);
  });
  const bytes = (await status(ben)).bytesIn;
  await until("ben's bytes to grow with the second screen share", async () => (await status(ben)).bytesIn > bytes + 20000);
  const now = (await status(ben)).transceivers;
  if (now !== bensTransceivers) throw new Error(`ben has ${now} transceivers with amy's second share, ${bensTransceivers} before it`);
  await amy.page.evaluate(() => window.jsSdk.stopScreenShare());
  await until("ben's second screen-share feed to end", async () => (await status(ben)).remoteFeeds.length === 1);
  log(`amy shared again: ben got it on the m-line the first share left (${now} transceivers)`);
}

/**
 * Amy hangs up and calls the bot again: ben's m-lines that carried her
 * camera go inactive, and her new call's stream comes on them, relabelled
 * (a new msid there is a new track and stream to Chrome, a new feed to
 * matrix-js-sdk), so ben's peer connection gains no transceiver.
 */
async function callAgain(amy, ben, status, room, connectedWithMedia) {
  const before = await status(ben);
  await amy.page.evaluate(() => window.jsSdk.hangup());
  let seen;
  await until("ben's feed from amy to end", async () => (seen = await status(ben)).remoteFeeds.length === 0, 30000).catch((e) => {
    throw new Error(`${e.message}; ben's call: ${JSON.stringify(seen)}`);
  });
  await amy.page.evaluate(([r, bot]) => window.jsSdk.placeCall(r, bot), [room, BOT]);
  await connectedWithMedia(amy, "called again");
  const { localStreams } = await status(amy);
  await until("ben to get amy's new call as one feed with audio and video", async () => {
    const s = (seen = await status(ben));
    const feed = s.remoteFeeds[0];
    return s.remoteFeeds.length === 1 && localStreams.some((id) => feed.stream.endsWith(`-${id}`)) && feed.audio > 0 && feed.video > 0;
  }, 30000).catch((e) => {
    throw new Error(`${e.message}; ben's call: ${JSON.stringify(seen)}`);
  });
  const bytes = (await status(ben)).bytesIn;
  await until("ben's bytes to grow with amy's new call", async () => (await status(ben)).bytesIn > bytes + 20000);
  const after = await status(ben);
  if (after.remoteFeeds[0].stream === before.remoteFeeds[0]?.stream) throw new Error(`ben's feed kept its stream id ${after.remoteFeeds[0].stream}`);
  if (after.transceivers !== before.transceivers) {
    throw new Error(`ben has ${after.transceivers} transceivers after amy called again, ${before.transceivers} before`);
  }
  log(`amy called again: ben's feed is her new stream, on the m-lines her first call left (${after.transceivers} transceivers)`);
}

async function jsSdkCalls(ctx, browser, script) {
  const users = [];
  const pageErrors = [];
  for (const name of ["amy", "ben"]) {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("console", (m) => {
      if (m.type() === "error" || /pushRemoteFeed|onTrack|NoUserMedia/.test(m.text())) log(`[${name} console.${m.type()}]`, m.text());
    });
    page.on("response", (r) => {
      if (r.status() >= 400) log(`[${name}] ${r.status()} ${r.request().method()} ${new URL(r.url()).pathname}`);
    });
    page.on("pageerror", (e) => {
      log(`[${name} page error]`, e.message);
      pageErrors.push(`${name}: ${e.message}`);
    });
    // Same origin as the homeserver; the demo page itself stays idle.
    await page.goto(ctx.url);
    await page.addScriptTag({ content: script });
    const baseUrl = new URL(ctx.url).origin;
    const id = await page.evaluate((args) => window.jsSdk.start(args), { baseUrl, user: `sdk${name}`, password: "correct horse battery" });
    users.push({ name, id, page });
  }
  const [amy, ben] = users;
  const status = (u) => u.page.evaluate(() => window.jsSdk.status());
  /** `u`'s call connects and shows a stream with audio and video, bytes arriving. */
  const connectedWithMedia = async (u, what) => {
    let seen;
    await until(`${u.name}'s MatrixCall (${what}) to connect and show a stream with audio and video`, async () => {
      const s = (seen = await status(u));
      if (s?.state === "ended") throw Object.assign(new Error(`${u.name}'s call ended: ${s.hangupReason}`), { fatal: true });
      return s?.state === "connected" && s.remoteFeeds.some((f) => f.audio > 0 && f.video > 0) && s.bytesIn > 20000;
    }, 45000).catch((e) => {
      throw new Error(`${e.message}; the call: ${JSON.stringify(seen)}`);
    });
  };
  // Multi-stream (the default), then a room whose state asks for one mixed
  // stream: there each call gets the bot's mix on its own m-lines, labelled.
  for (const mode of ["multi_stream", "single_stream"]) {
    const state = [{ type: "io.switchboard.conference", state_key: "", content: { mode } }];
    const room = await amy.page.evaluate(([invite, s]) => window.jsSdk.createRoom(invite, s), [[ben.id, BOT], state]);
    await ben.page.evaluate((r) => window.jsSdk.join(r), room);
    await until("the bot to join the matrix-js-sdk room", async () =>
      (await amy.page.evaluate((r) => window.jsSdk.joinedMembers(r), room)).includes(BOT),
    );
    for (const u of users) {
      await until(`${u.name}'s client to know the room`, () => u.page.evaluate((r) => window.jsSdk.knowsRoom(r), room));
      await u.page.evaluate(([r, bot]) => window.jsSdk.placeCall(r, bot), [room, BOT]);
    }
    for (const u of users) await connectedWithMedia(u, mode);
    for (const u of users) {
      const start = (await status(u)).bytesIn;
      await until(`${u.name}'s received bytes to keep growing`, async () => (await status(u)).bytesIn > start + 20000);
      const s = await status(u);
      log(`${u.name} (matrix-js-sdk, ${mode}):`, JSON.stringify(s));
      if (s.remoteFeeds.length !== 1) throw new Error(`${u.name} has ${s.remoteFeeds.length} remote feeds in ${mode}`);
      // Multi-stream: the other's own stream (its msid, which the SFU
      // prefixes to keep publishers apart); single-stream: the bot's mix.
      const other = (await status(users.find((o) => o !== u))).localStreams;
      const stream = s.remoteFeeds[0].stream;
      const right = mode === "multi_stream" ? other.some((id) => stream.endsWith(`-${id}`)) : stream.startsWith("sb-");
      if (!right) throw new Error(`${u.name}'s feed in ${mode} is stream ${stream} (the other sends ${other})`);
      await u.page.screenshot({ path: join(outDir, `js-sdk-conference-${mode}-${u.name}.png`) });
    }
    if (mode === "multi_stream") {
      await screenShare(amy, ben, status);
      await callAgain(amy, ben, status, room, connectedWithMedia);
    }
    if (pageErrors.length) throw new Error(`matrix-js-sdk threw: ${pageErrors.join("; ")}`);
    for (const u of users) await u.page.evaluate(() => window.jsSdk.hangup());
    await until("both calls to end", async () => (await Promise.all(users.map(status))).every((s) => s.state === "ended"));
  }
  // Dial-in: amy calls the bot, ben says !dialin; the bot calls ben in a
  // direct room and ben answers with matrix-js-sdk: each gets the other.
  const room = await amy.page.evaluate((invite) => window.jsSdk.createRoom(invite), [ben.id, BOT]);
  await ben.page.evaluate((r) => window.jsSdk.join(r), room);
  await until("the bot to join the dial-in group room", async () =>
    (await amy.page.evaluate((r) => window.jsSdk.joinedMembers(r), room)).includes(BOT),
  );
  await until("amy's client to know the room", () => amy.page.evaluate((r) => window.jsSdk.knowsRoom(r), room));
  await amy.page.evaluate(([r, bot]) => window.jsSdk.placeCall(r, bot), [room, BOT]);
  await until("ben's client to know the room", () => ben.page.evaluate((r) => window.jsSdk.knowsRoom(r), room));
  await ben.page.evaluate((r) => window.jsSdk.sendText(r, "!dialin"), room);
  const dm = await until("the bot's invite to a dial-in room", async () => (await ben.page.evaluate(() => window.jsSdk.invites()))[0]);
  await ben.page.evaluate((r) => window.jsSdk.join(r), dm);
  await until("the bot's call to ring in ben's matrix-js-sdk", () => ben.page.evaluate((r) => window.jsSdk.answerIncoming(r), dm), 30000);
  for (const u of users) await connectedWithMedia(u, "dial-in");
  // matrix-js-sdk rings only for an offer that brings a stream, so the bot's
  // offer sends one (labelled as the bot's) on its two m-lines; the
  // renegotiation that brings amy turns them receive-only, which ends that
  // silent feed: one feed each.
  for (const u of users) {
    let seen;
    await until(`${u.name} to have exactly one remote feed after the dial-in`, async () => {
      seen = await status(u);
      return seen.remoteFeeds.length === 1;
    }).catch((e) => {
      throw new Error(`${e.message}; the call: ${JSON.stringify(seen)}`);
    });
    log(`${u.name} (matrix-js-sdk, dial-in):`, JSON.stringify(seen));
    // Ben publishes on the m-lines of the bot's offer, whose msid is the
    // bot's for him (`sb-<ben>`); amy on her own.
    const otherUser = users.find((o) => o !== u);
    const other = u === amy ? [`sb-sdk${ben.name}localhost`] : (await status(otherUser)).localStreams;
    if (!other.some((id) => seen.remoteFeeds[0].stream.endsWith(`-${id}`))) {
      throw new Error(`${u.name}'s feed after the dial-in is not the other's stream: ${JSON.stringify(seen)} vs ${other}`);
    }
    await u.page.screenshot({ path: join(outDir, `js-sdk-conference-dial-in-${u.name}.png`) });
  }
  if (pageErrors.length) throw new Error(`matrix-js-sdk threw: ${pageErrors.join("; ")}`);
  for (const u of users) await u.page.evaluate(() => window.jsSdk.hangup());
  await until("both calls to end", async () => (await Promise.all(users.map(status))).every((s) => s.state === "ended"));
  await voiceCalls(users, status, ctx.url);
}

/**
 * Voice calls to the bot: audio alone, which the SFU decrypts itself
 * (sfu/src/ingress.rs) and reports on in RTCP receiver reports of its own.
 * Each hears the other, the server says it opened their audio, and Chrome
 * read the reports: its remote-inbound-rtp for its audio has a round-trip
 * time, which only the reports' LSR/DLSR (echoing its sender reports) give.
 */
async function voiceCalls(users, status, url) {
  const [amy, ben] = users;
  const opened = async () => {
    const text = await (await fetch(`${new URL(url).origin}/metrics`)).text();
    return Number(text.match(/^switchboard_sfu_packets_opened_total(?:\{[^}]*\})? (\d+)/m)?.[1] || 0);
  };
  const before = await opened();
  const room = await amy.page.evaluate((invite) => window.jsSdk.createRoom(invite), [ben.id, BOT]);
  await ben.page.evaluate((r) => window.jsSdk.join(r), room);
  await until("the bot to join the voice room", async () =>
    (await amy.page.evaluate((r) => window.jsSdk.joinedMembers(r), room)).includes(BOT),
  );
  for (const u of users) {
    await until(`${u.name}'s client to know the voice room`, () => u.page.evaluate((r) => window.jsSdk.knowsRoom(r), room));
    await u.page.evaluate(([r, bot]) => window.jsSdk.placeCall(r, bot, true), [room, BOT]);
  }
  for (const u of users) {
    let seen;
    await until(`${u.name}'s voice call to connect, hear the other and read the SFU's reports on its audio`, async () => {
      const s = await status(u);
      if (s?.state === "ended") throw Object.assign(new Error(`${u.name}'s call ended: ${s.hangupReason}`), { fatal: true });
      if (s?.state !== "connected") return false;
      seen = await u.page.evaluate(() => window.jsSdk.audioReports());
      return seen.packetsIn > 100 && seen.reports.some((r) => r.roundTripTime > 0 && r.packetsLost >= 0);
    }, 45000).catch((e) => {
      throw new Error(`${e.message}; saw ${JSON.stringify(seen)}`);
    });
    log(`${u.name} (matrix-js-sdk, voice call):`, JSON.stringify(seen));
  }
  const count = (await opened()) - before;
  if (count < 200) throw new Error(`the SFU opened ${count} packets of the voice calls itself`);
  log(`the SFU opened ${count} audio packets itself`);
  for (const u of users) await u.page.evaluate(() => window.jsSdk.hangup());
}

// Scenario 2 (relay only, through our TURN relay) needs the relay in the binary.
const scenarios = only.length ? only : TURN_RELAY ? [...ALL.slice(0, 2), "relay-only", ...ALL.slice(2)] : ALL;

const SCENARIOS = {
  "one-to-one": oneToOne,
  "relay-only": relayOnly,
  declined,
  "relay-unavailable": relayUnavailable,
  "ice-failed": iceFailed,
  unreachable,
  "camera-denied": cameraDenied,
  conference,
  "lossy-conference": lossyConference,
  "simulcast-added": simulcastAdded,
  "js-sdk-conference": jsSdkConference,
};

// ---- main --------------------------------------------------------------------

const verdict = {};
let server;
let browser;
try {
  server = await startServer(turnArgs(true));
  log("switchboard at", server.url, TURN_RELAY ? "(with its TURN relay)" : "(this build has no TURN relay: no relay-only scenario)");
  browser = await launch();
  log("chromium", browser.version());
  const registered = new Map();
  const ctx = {
    browser,
    url: server.url,
    /** Users by name: opened and registered once, reused across scenarios. */
    async users(...names) {
      const users = [];
      for (const name of names) {
        if (!registered.has(name)) {
          const user = await User.open(browser, server.url, name);
          await user.register();
          registered.set(name, user);
        }
        users.push(registered.get(name));
      }
      return users;
    },
  };
  for (const name of scenarios) {
    const run = SCENARIOS[name];
    if (!run) {
      verdict[name] = "no such scenario";
      continue;
    }
    log("scenario", name);
    try {
      await run(ctx);
      verdict[name] = "ok";
    } catch (e) {
      verdict[name] = e.message;
      log("FAILED", name, e.stack);
      for (const u of registered.values()) await u.shot(`${name}-failure`).catch(() => {});
    }
  }
} catch (e) {
  verdict.setup = e.message;
  log("setup failed", e.stack);
} finally {
  await browser?.close().catch(() => {});
  server?.stop();
  if (server) rmSync(server.dataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(verdict));
process.exit(Object.values(verdict).every((v) => v === "ok") ? 0 : 1);
