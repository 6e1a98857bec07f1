// fleetcast-servers.js: where a client connects. The list of server base URLs (one per node
// of a deployment), what each node's /config.json and /certificate.sha256 say, and the session
// URLs built from them. Pure functions except the two fetches at the bottom, which take the
// fetch function and an AbortSignal from the caller. Used by fleetcast-client.js.

/**
 * Normalised base URLs from the `server` option: a URL string or an array of them, absolute
 * (`https://fleet.example`) or relative to `baseHref` (the page's address). A base URL keeps
 * its path, so `https://example.com/fleet/` means `https://example.com/fleet/config.json`.
 * Throws a TypeError that names the bad entry.
 */
export function serverList(server, baseHref) {
  const given = Array.isArray(server) ? server : [server];
  if (given.length === 0) throw new TypeError('fleetcast: `server` is an empty list');
  const out = [];
  for (const s of given) {
    const url = normaliseServer(s, baseHref);
    if (url === null) {
      throw new TypeError(`fleetcast: server ${JSON.stringify(s)} is not an http(s) URL`);
    }
    if (!out.includes(url)) out.push(url);
  }
  return out;
}

/** `s` as a base URL without a trailing slash, query or fragment; null if it is not one. */
export function normaliseServer(s, baseHref) {
  if (typeof s !== 'string' || s.trim() === '') return null;
  let url;
  try {
    url = new URL(s.trim(), baseHref);
  } catch {
    return null;
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return null;
  if (url.username || url.password) return null; // credentials never go in a fleetcast URL
  return `${url.origin}${url.pathname.replace(/\/+$/, '')}`;
}

/**
 * `list` followed by the nodes a /config.json named in its `servers` field that are not on it
 * yet. Entries that are not http(s) URLs are ignored: this is network input.
 */
export function mergeServers(list, servers) {
  if (!Array.isArray(servers)) return list;
  const out = [...list];
  for (const s of servers) {
    const url = normaliseServer(s);
    if (url !== null && !out.includes(url)) out.push(url);
  }
  return out;
}

/** What a client needs from /config.json, checked. Throws an Error naming the bad field. */
export function checkConfig(json) {
  const bad = (what) => new Error(`config.json: ${what}`);
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw bad('not an object');
  const port = json.webtransport_port;
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw bad('bad webtransport_port');
  for (const key of ['session_path', 'websocket_path']) {
    if (typeof json[key] !== 'string' || !json[key].startsWith('/')) throw bad(`bad ${key}`);
  }
  const tick = json.tick_interval_ms;
  if (!Number.isInteger(tick) || tick < 1) throw bad('bad tick_interval_ms');
  if (!Number.isInteger(json.protocol_version)) throw bad('bad protocol_version');
  return {
    protocolVersion: json.protocol_version,
    webtransportPort: port,
    sessionPath: json.session_path,
    websocketPath: json.websocket_path,
    tickIntervalMs: tick,
    tokenRequired: json.token_required === true,
    servers: Array.isArray(json.servers) ? json.servers : [],
  };
}

/**
 * The certificate hashes in a /certificate.sha256 body (one 64-digit hex SHA-256 a line,
 * colons allowed), as WebTransport's `serverCertificateHashes`. Throws on anything else.
 */
export function parseCertificateHashes(text) {
  const lines = text.split('\n').map((l) => l.trim().replace(/:/g, '')).filter(Boolean);
  if (!lines.length || !lines.every((hex) => /^[0-9a-fA-F]{64}$/.test(hex))) {
    throw new Error('certificate.sha256: not a list of SHA-256 hashes');
  }
  return lines.map((hex) => ({
    algorithm: 'sha-256',
    value: Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16)),
  }));
}

/** `url` with `?token=` (URL-encoded) appended, or unchanged when `token` is null. */
export function withToken(url, token) {
  if (token === null || token === undefined) return url;
  return `${url}${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
}

/** The WebTransport session URL of node `base` (its host, the UDP port from its config). */
export function webTransportUrl(base, config) {
  const { hostname } = new URL(base); // IPv6 hosts keep their brackets
  return `https://${hostname}:${config.webtransportPort}${config.sessionPath}`;
}

/** The WebSocket URL of node `base`: ws:// beside http://, wss:// beside https://. */
export function webSocketUrl(base, config) {
  const url = new URL(base);
  const scheme = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${url.host}${url.pathname.replace(/\/+$/, '')}${config.websocketPath}`;
}

// ---- Fetches (the caller passes fetch and an AbortSignal) ----------------------------------

async function get(fetchFn, url, signal) {
  return fetchFn(url, { cache: 'no-store', signal });
}

/** GET `base`/config.json, checked by checkConfig. */
export async function fetchConfig(fetchFn, base, signal) {
  const r = await get(fetchFn, `${base}/config.json`, signal);
  if (!r.ok) throw new Error(`config.json: HTTP ${r.status}`);
  return checkConfig(await r.json());
}

/**
 * GET `base`/certificate.sha256: the hashes to pass to WebTransport, or [] when the node
 * answers 404 (a CA-issued certificate: the browser checks it against its roots).
 */
export async function fetchCertificateHashes(fetchFn, base, signal) {
  const r = await get(fetchFn, `${base}/certificate.sha256`, signal);
  if (r.status === 404) return [];
  if (!r.ok) throw new Error(`certificate.sha256: HTTP ${r.status}`);
  return parseCertificateHashes(await r.text());
}
