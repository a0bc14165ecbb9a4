// A small Matrix Client-Server API client: what the demo needs and no more.
// Spec: https://spec.matrix.org/v1.15/client-server-api/

/** The homeserver answered with a Matrix error (`{errcode, error}`). */
export class MatrixError extends Error {
  constructor(status, errcode, message) {
    super(message || errcode || `HTTP ${status}`);
    this.status = status;
    this.errcode = errcode || "";
  }
}

/** The homeserver could not be reached at all (network error, wrong URL, down). */
export class UnreachableError extends Error {
  constructor(baseUrl, cause) {
    super(`Cannot reach the homeserver at ${baseUrl}. Check the address and that it is running.`);
    this.cause = cause;
  }
}

/** Normalises what a person typed: no trailing slash, `http://` if no scheme. */
export function normaliseBaseUrl(input) {
  let url = (input || "").trim().replace(/\/+$/, "");
  if (url && !/^https?:\/\//i.test(url)) url = `http://${url}`;
  return url;
}

async function request(baseUrl, method, path, { token, body, query, timeoutMs = 20000, signal, keepalive = false } = {}) {
  const url = new URL(baseUrl + path);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
  }
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const timeout = AbortSignal.timeout(timeoutMs);
  const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: combined,
      keepalive,
    });
  } catch (e) {
    if (signal?.aborted) throw e;
    throw new UnreachableError(baseUrl, e);
  }
  let json = null;
  try {
    json = await response.json();
  } catch {
    if (!response.ok) throw new MatrixError(response.status, "", `The server at ${baseUrl} is not a Matrix homeserver (HTTP ${response.status}).`);
    throw new MatrixError(response.status, "", `The server at ${baseUrl} sent an answer that is not JSON.`);
  }
  if (!response.ok) throw new MatrixError(response.status, json?.errcode, json?.error);
  return json;
}

/** A session on a homeserver: `{baseUrl, userId, deviceId, accessToken}`. */
export class MatrixClient {
  constructor(session) {
    this.baseUrl = session.baseUrl;
    this.userId = session.userId;
    this.deviceId = session.deviceId;
    this.accessToken = session.accessToken;
    this.txnCounter = 0;
    this.txnPrefix = `web${Date.now().toString(36)}`;
  }

  get session() {
    return { baseUrl: this.baseUrl, userId: this.userId, deviceId: this.deviceId, accessToken: this.accessToken };
  }

  /** The server part of our user id (`localhost` in `@alice:localhost`). */
  get serverName() {
    return this.userId.slice(this.userId.indexOf(":") + 1);
  }

  static async checkServer(baseUrl) {
    const versions = await request(baseUrl, "GET", "/_matrix/client/versions", { timeoutMs: 8000 });
    if (!Array.isArray(versions?.versions)) {
      throw new MatrixError(0, "", `The server at ${baseUrl} is not a Matrix homeserver.`);
    }
  }

  static async register(baseUrl, username, password) {
    await MatrixClient.checkServer(baseUrl);
    const body = {
      username,
      password,
      initial_device_display_name: "Switchboard web demo",
      auth: { type: "m.login.dummy" },
    };
    const r = await request(baseUrl, "POST", "/_matrix/client/v3/register", { body });
    return new MatrixClient({ baseUrl, userId: r.user_id, deviceId: r.device_id, accessToken: r.access_token });
  }

  static async login(baseUrl, username, password) {
    await MatrixClient.checkServer(baseUrl);
    const body = {
      type: "m.login.password",
      identifier: { type: "m.id.user", user: username },
      password,
      initial_device_display_name: "Switchboard web demo",
    };
    const r = await request(baseUrl, "POST", "/_matrix/client/v3/login", { body });
    return new MatrixClient({ baseUrl, userId: r.user_id, deviceId: r.device_id, accessToken: r.access_token });
  }

  call(method, path, options = {}) {
    return request(this.baseUrl, method, `/_matrix/client/v3${path}`, { token: this.accessToken, ...options });
  }

  logout() {
    return this.call("POST", "/logout", { body: {} });
  }

  whoami() {
    return this.call("GET", "/account/whoami");
  }

  createRoom({ name, invite }) {
    return this.call("POST", "/createRoom", { body: { name, invite, preset: "private_chat" } });
  }

  invite(roomId, userId) {
    return this.call("POST", `/rooms/${encodeURIComponent(roomId)}/invite`, { body: { user_id: userId } });
  }

  join(roomId) {
    return this.call("POST", `/rooms/${encodeURIComponent(roomId)}/join`, { body: {} });
  }

  leave(roomId) {
    return this.call("POST", `/rooms/${encodeURIComponent(roomId)}/leave`, { body: {} });
  }

  /** Sends a room event with a fresh transaction id (retries reuse it). */
  async send(roomId, type, content, { keepalive = false } = {}) {
    this.txnCounter += 1;
    const txn = `${this.txnPrefix}.${this.txnCounter}`;
    const path = `/rooms/${encodeURIComponent(roomId)}/send/${encodeURIComponent(type)}/${txn}`;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.call("PUT", path, { body: content, keepalive });
      } catch (e) {
        if (attempt >= 2 || e instanceof MatrixError) throw e;
        await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
      }
    }
  }

  /** ICE servers from `/voip/turnServer` in `RTCIceServer` form (empty when none). */
  async iceServers() {
    const r = await this.call("GET", "/voip/turnServer");
    if (!r?.uris?.length) return [];
    return [{ urls: r.uris, username: r.username, credential: r.password }];
  }

  sync(since, timeoutMs, signal) {
    const filter = JSON.stringify({ room: { timeline: { limit: 30 } } });
    return this.call("GET", "/sync", {
      query: { since, timeout: timeoutMs, filter },
      timeoutMs: timeoutMs + 15000,
      signal,
    });
  }
}
