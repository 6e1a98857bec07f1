// fleetcast web demo: connects over WebTransport (or the WebSocket fallback), applies the
// stream and datagrams with FleetView, and draws roads and every car on a canvas, gliding
// between the 1 s fixes. State for people and tests: window.fleetcast.
//
// ?transport=websocket forces the WebSocket; without WebTransport, or when a WebTransport
// session cannot open, the page falls back to it by itself. ?token=JWT is passed on to the
// server (both transports) for a server started with --subscribe-secret.

import {
  FrameDecoder,
  FleetView,
  decodeDatagram,
  checkHello,
  wsCloseCode,
  METRES_PER_DEGREE,
  toLatLon,
  headingDeg,
  speedMps,
  ageS,
  CloseCode,
  WS_CHANNEL_STREAM,
  WS_CHANNEL_DATAGRAM,
} from './fleetcast-wire.js';
import { retryDelayMs } from './backoff.js';

const params = new URLSearchParams(location.search);
const forced = params.get('transport'); // 'websocket' | 'webtransport' | null
/** Subscriber token from the page's own URL, passed on in the session URLs (or null). */
const token = params.get('token') || null;
/** What the stats panel says when the server requires a token and a session was refused. */
const TOKEN_REFUSED = 'refused (token missing, invalid or expired?)';
const OPEN_TIMEOUT_MS = 5000;
/** Longest a car is dead-reckoned past its last fix, in tick intervals (then it waits). */
const MAX_EXTRAPOLATE_TICKS = 3;
/** Time constant of the ease from the drawn position to the corrected one, seconds. */
const EASE_S = 0.35;
const LABELS_UP_TO = 400;

// ---- Live state, exposed for people and tests -------------------------------------------

const fc = {
  transport: null, // 'webtransport' | 'websocket'
  connected: false,
  state: 'connecting', // connecting | connected | reconnecting | offline
  cars: 0,
  carsDrawn: 0,
  initialCars: null,
  ticksReceived: 0,
  ticksMissed: 0,
  ticksComplete: 0,
  tick: null,
  latencyP50Ms: null,
  bytesPerSecond: 0,
  sessions: 0,
  reconnects: 0,
  badDatagrams: 0,
  lastClose: null, // transport close {code, reason} of the last session
  lastGoodbye: null, // Goodbye frame {code, reason} of the last session, if it sent one
  lastError: null,
  /** The server's protocol version when this page does not speak it (the session was closed). */
  unsupportedVersion: null,
  fallbackReason: null,
  certificateHashes: 0, // hashes passed to the last WebTransport session (2 while renewing)
  tokenGiven: token !== null,
  tokenRequired: null, // from /config.json
  tokenStatus: null, // null (not required) | 'sent' | 'accepted' | TOKEN_REFUSED
  selected: null,
  pinned: null,
};
/**
 * Every car on the roster: its label, where it was last drawn (CSS pixels) and, once a sample
 * arrived, its position, heading, speed, the fix's age at its tick and that tick's time.
 */
fc.carList = () =>
  [...view.cars.values()].map((e) => {
    const s = sprites.get(e.id);
    const car = { id: e.id, label: e.label, tick: e.tick, screen: s?.screen ?? null };
    const q = view.hello?.quant;
    if (q && e.sample) {
      const { lat, lon } = toLatLon(q, e.sample.x * q.unit_m, e.sample.y * q.unit_m);
      Object.assign(car, {
        lat,
        lon,
        headingDeg: headingDeg(e.sample.heading),
        speedMps: speedMps(q, e.sample.speed),
        ageS: ageS(e.sample.age),
        tickTimeMs: e.time_us / 1000,
      });
    }
    return car;
  });
window.fleetcast = fc;

// Totals of earlier sessions, so counters keep growing across reconnects.
let earlier = { received: 0, missed: 0, complete: 0 };
let view = new FleetView();
let roads = null;
let tickIntervalMs = 1000;
/** Quantisation of the last Hello: kept while reconnecting so cars keep their colours. */
let lastQuant = null;
/** Served area of the last Hello that carried one (south, west, north, east degrees). */
let lastBounds = null;

// ---- Render state per car ----------------------------------------------------------------

/** id -> {id, fix: {e, n, ve, vn, at}, off: {e, n, at}, hdg, drawn: {e, n}, entry} */
const sprites = new Map();

function nowS() {
  return performance.now() / 1000;
}

/** Where the fix predicts the car to be at time t (dead reckoning, capped). */
function predicted(fix, t) {
  const dt = Math.min(Math.max(t - fix.at, 0), (MAX_EXTRAPOLATE_TICKS * tickIntervalMs) / 1000);
  return { e: fix.e + fix.ve * dt, n: fix.n + fix.vn * dt };
}

/** Drawn position at time t: the prediction plus a correction that fades out. */
function position(s, t) {
  const p = predicted(s.fix, t);
  const k = Math.exp(-(t - s.off.at) / EASE_S);
  return { e: p.e + s.off.e * k, n: p.n + s.off.n * k };
}

/** Takes a new fix for a car without a jump: the old drawn position eases into the new path. */
function updateSprite(entry) {
  const q = view.hello?.quant;
  if (!q || !entry.sample) return;
  const smp = entry.sample;
  const t = nowS();
  const hdg = headingDeg(smp.heading);
  const v = speedMps(q, smp.speed);
  const rad = (hdg * Math.PI) / 180;
  const fix = {
    e: smp.x * q.unit_m,
    n: smp.y * q.unit_m,
    ve: v * Math.sin(rad),
    vn: v * Math.cos(rad),
    // The fix was taken age × 100 ms before the tick; the tick left the server ~now.
    at: t - ageS(smp.age),
  };
  let s = sprites.get(entry.id);
  if (!s) {
    s = { id: entry.id, fix, off: { e: 0, n: 0, at: t }, hdg, drawnHdg: hdg, entry, tick: entry.tick };
    sprites.set(entry.id, s);
    return;
  }
  const was = position(s, t);
  const will = predicted(fix, t);
  s.fix = fix;
  s.off = { e: was.e - will.e, n: was.n - will.n, at: t };
  s.hdg = hdg;
  s.entry = entry;
  s.tick = entry.tick;
}

function syncSprites() {
  for (const id of sprites.keys()) if (!view.cars.has(id)) sprites.delete(id);
  for (const entry of view.cars.values()) {
    const s = sprites.get(entry.id);
    if (!s || s.entry !== entry || s.tick !== entry.tick) updateSprite(entry);
  }
}

// ---- Stats -------------------------------------------------------------------------------

const latencies = []; // ms, one per tick, newest last
const byteLog = []; // [time s, bytes]
let lastLatencyTick = null;

function countBytes(n) {
  byteLog.push([nowS(), n]);
}

function noteTickLatency(part) {
  if (part.tick === lastLatencyTick || typeof part.time_us !== 'number') return;
  lastLatencyTick = part.tick;
  latencies.push(Date.now() - part.time_us / 1000);
  if (latencies.length > 60) latencies.shift();
}

function refreshStats() {
  const t = nowS();
  while (byteLog.length && byteLog[0][0] < t - 5) byteLog.shift();
  const span = byteLog.length ? Math.max(1, t - byteLog[0][0]) : 1;
  fc.bytesPerSecond = Math.round(byteLog.reduce((a, [, b]) => a + b, 0) / span);
  if (latencies.length) {
    const sorted = [...latencies].sort((a, b) => a - b);
    fc.latencyP50Ms = Math.round(sorted[Math.floor(sorted.length / 2)] * 10) / 10;
  }
  const c = view.counts;
  fc.ticksReceived = earlier.received + c.received;
  fc.ticksMissed = earlier.missed + c.missed;
  fc.ticksComplete = earlier.complete + c.complete;
  fc.cars = view.cars.size;
  fc.initialCars = view.initialCars;
}

// ---- Applying what arrives ---------------------------------------------------------------

function onMessage(msg) {
  if (msg.type === 'Goodbye') {
    fc.lastGoodbye = { code: msg.code, reason: msg.reason };
    setNotice(msg.code === CloseCode.GoingAway ? 'Server restarting — will reconnect.' : `Server closed the session: ${msg.reason}`);
    return;
  }
  // A server speaking another version: throws, and the transport closes with code 5.
  if (msg.type === 'Hello') checkHello(msg);
  view.applyMessage(msg);
  if (msg.type === 'Hello') {
    tickIntervalMs = msg.tick_interval_ms;
    lastQuant = msg.quant;
    if (msg.bounds) lastBounds = msg.bounds;
  }
  if (msg.type === 'State') fc.tick = msg.tick;
  syncSprites();
}

function onDatagram(bytes) {
  countBytes(bytes.length);
  let part;
  try {
    part = decodeDatagram(bytes);
  } catch {
    fc.badDatagrams += 1; // a datagram stands alone: drop it, keep the session
    return;
  }
  noteTickLatency(part);
  const outcome = view.applyPart(part);
  if (typeof part.tick === 'number' && (fc.tick === null || part.tick > fc.tick)) fc.tick = part.tick;
  for (const entry of outcome.changed) updateSprite(entry);
}

/**
 * Why a session must end after `e` (thrown while applying the stream): the protocol close code
 * and a reason. Shows a version mismatch on the page; it persists across reconnections.
 */
function closeFor(e) {
  fc.lastError = `stream: ${e.message}`;
  if (e?.kind === 'UnsupportedVersion') {
    fc.unsupportedVersion = e.message;
    setNotice(`This page cannot read this server: ${e.message}. Reload the page.`);
    return { code: CloseCode.UnsupportedVersion, reason: 'unsupported protocol version' };
  }
  return { code: CloseCode.ProtocolViolation, reason: 'protocol violation' };
}

/** Feeds reliable-stream bytes; throws on bytes that do not decode (the session must end). */
function makeStreamSink() {
  const frames = new FrameDecoder();
  return (bytes) => {
    countBytes(bytes.length);
    frames.push(bytes);
    for (let m; (m = frames.next()) !== null; ) onMessage(m);
  };
}

// ---- Transports --------------------------------------------------------------------------

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function fetchJson(path) {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

/**
 * The certificate hashes to trust, one a line on the server: the certificate in use and, while
 * the server renews it, the next one. None (system roots) when the server says 404.
 */
async function certificateHashes() {
  const r = await fetch('/certificate.sha256', { cache: 'no-store' });
  if (r.status === 404) return [];
  if (!r.ok) throw new Error(`/certificate.sha256: HTTP ${r.status}`);
  const lines = (await r.text()).split('\n').map((l) => l.trim().replace(/:/g, '')).filter(Boolean);
  if (!lines.length || !lines.every((hex) => /^[0-9a-fA-F]{64}$/.test(hex))) {
    throw new Error('malformed certificate hash');
  }
  fc.certificateHashes = lines.length;
  return lines.map((hex) => ({
    algorithm: 'sha-256',
    value: Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16)),
  }));
}

/** `url` with the page's subscriber token, if it has one, as `?token=` (URL-encoded). */
function withToken(url) {
  return token === null ? url : `${url}${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
}

/** Opens a WebTransport session; resolves with a runner once it is ready. */
async function openWebTransport(config) {
  const hashes = await certificateHashes();
  const url = withToken(`https://${location.hostname}:${config.webtransport_port}${config.session_path}`);
  const wt = new WebTransport(url, hashes.length ? { serverCertificateHashes: hashes } : {});
  wt.closed.catch(() => {}); // observed in run()
  try {
    await withTimeout(wt.ready, OPEN_TIMEOUT_MS, 'WebTransport handshake');
  } catch (e) {
    try { wt.close(); } catch { /* already failed */ }
    throw e;
  }
  return {
    name: 'webtransport',
    close: (code, reason) => wt.close({ closeCode: code, reason }),
    run: async () => {
      const sink = makeStreamSink();
      const readStream = (async () => {
        const streams = wt.incomingUnidirectionalStreams.getReader();
        const { value: stream, done } = await streams.read();
        if (done) return;
        const reader = stream.getReader();
        for (;;) {
          const { value, done: end } = await reader.read();
          if (end) {
            // The server finishes the stream only after its Goodbye, which has now been read:
            // end the session from this side, before the server's close could abort the stream
            // with bytes still unread (PROTOCOL.md section 8.1).
            try { wt.close({ closeCode: CloseCode.Normal, reason: 'goodbye received' }); } catch { /* closed */ }
            return;
          }
          sink(value);
        }
      })();
      let ended = false;
      const readDatagrams = (async () => {
        const reader = wt.datagrams.readable.getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done || ended) return;
          onDatagram(value);
        }
      })();
      readStream.catch((e) => {
        if (e?.name === 'DecodeError') {
          ended = true;
          const { code, reason } = closeFor(e);
          wt.close({ closeCode: code, reason });
        }
      });
      readDatagrams.catch(() => {});
      try {
        const info = await wt.closed;
        return { code: info?.closeCode ?? 0, reason: info?.reason ?? '' };
      } catch (e) {
        return { code: null, reason: String(e?.message ?? e) };
      }
    },
  };
}

/** Opens the WebSocket fallback; resolves with a runner once it is open. */
async function openWebSocket(config) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(withToken(`${scheme}://${location.host}${config.websocket_path}`));
  ws.binaryType = 'arraybuffer';
  const sink = makeStreamSink();
  let ended;
  const closed = new Promise((resolve) => { ended = resolve; });
  ws.onclose = (ev) => ended({ code: ev.code, reason: ev.reason });
  let failed = false;
  ws.onmessage = (ev) => {
    if (failed || !(ev.data instanceof ArrayBuffer) || ev.data.byteLength === 0) return;
    const bytes = new Uint8Array(ev.data);
    const body = bytes.subarray(1);
    try {
      if (bytes[0] === WS_CHANNEL_STREAM) sink(body);
      else if (bytes[0] === WS_CHANNEL_DATAGRAM) onDatagram(body);
    } catch (e) {
      // Section 11.4: the client's WebSocket close code is 4000 + the protocol's close code.
      failed = true;
      const { code, reason } = closeFor(e);
      ws.close(wsCloseCode(code), reason);
    }
  };
  await withTimeout(
    new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error('WebSocket could not open'));
    }),
    OPEN_TIMEOUT_MS,
    'WebSocket open',
  ).catch((e) => {
    ws.close();
    throw e;
  });
  return {
    name: 'websocket',
    close: (code, reason) => ws.close(code, reason),
    run: () => closed,
  };
}

/** One session: config, transport choice with fallback, then run until it ends. */
async function session() {
  const config = await fetchJson('/config.json');
  fc.tokenRequired = config.token_required === true;
  if (fc.tokenRequired && fc.tokenStatus !== TOKEN_REFUSED) fc.tokenStatus = token === null ? null : 'sent';
  if (!roads) {
    roads = await fetchJson('/roads.json').catch(() => null);
    roadLayer = null; // redraw with the roads
  }
  let conn = null;
  const haveWT = typeof window.WebTransport === 'function';
  if (forced !== 'websocket' && haveWT) {
    try {
      conn = await openWebTransport(config);
      fc.fallbackReason = null;
    } catch (e) {
      if (forced === 'webtransport') throw e;
      fc.fallbackReason = `WebTransport failed: ${e.message}`;
    }
  } else if (forced === 'websocket') {
    fc.fallbackReason = 'forced by ?transport=websocket';
  } else {
    if (forced === 'webtransport') throw new Error('this browser has no WebTransport');
    fc.fallbackReason = 'this browser has no WebTransport';
  }
  if (!conn) {
    try {
      conn = await openWebSocket(config);
    } catch (e) {
      // Neither transport opened. Browsers hide the status of a refused session (401 on both
      // transports for a bad token), so with a token required, say that it may be the cause.
      if (fc.tokenRequired) {
        fc.tokenStatus = TOKEN_REFUSED;
        setNotice(token === null
          ? 'This server requires a subscriber token: open the page with ?\u2060token=…'
          : 'The server refused the session: the token may be invalid or expired.');
      }
      throw e;
    }
  }
  if (fc.tokenRequired) fc.tokenStatus = 'accepted';

  view = new FleetView();
  lastLatencyTick = null;
  fc.lastGoodbye = null;
  fc.transport = conn.name;
  fc.connected = true;
  fc.sessions += 1;
  setState('connected');
  setNotice(fc.fallbackReason && conn.name === 'websocket' ? `WebSocket fallback: ${fc.fallbackReason}` : null);
  const end = await conn.run();
  fc.connected = false;
  view.finish();
  refreshStats();
  const c = view.counts;
  const hadData = view.initialCars !== null || c.received > 0;
  earlier = {
    received: earlier.received + c.received,
    missed: earlier.missed + c.missed,
    complete: earlier.complete + c.complete,
  };
  view = new FleetView(); // keeps counters from being added twice
  fc.lastClose = { code: end.code, reason: end.reason };
  return hadData;
}

async function main() {
  let attempt = 0;
  for (;;) {
    let hadData = false;
    try {
      setState(fc.sessions ? 'reconnecting' : 'connecting');
      hadData = await session();
    } catch (e) {
      fc.lastError = String(e?.message ?? e);
    }
    fc.connected = false;
    attempt = hadData ? 0 : attempt + 1;
    // Full jitter over a window that doubles per failed attempt (backoff.js): the pages a
    // restarted server lost all at once come back spread over the window, not in one burst.
    const delay = retryDelayMs(attempt, Math.random());
    fc.reconnects += 1;
    const until = performance.now() + delay;
    setState('reconnecting', until);
    await new Promise((r) => setTimeout(r, delay));
  }
}

// ---- UI ----------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
let reconnectAt = null;

function setState(state, until = null) {
  fc.state = state;
  reconnectAt = until;
  renderConn();
}

function renderConn() {
  const pill = $('conn');
  pill.dataset.state = fc.state;
  let text = fc.state;
  if (fc.state === 'connected') text = `live · ${fc.transport === 'webtransport' ? 'WebTransport' : 'WebSocket'}`;
  if (fc.state === 'reconnecting' && reconnectAt) {
    const s = Math.max(0, (reconnectAt - performance.now()) / 1000);
    text = s > 0.05 ? `reconnecting in ${s.toFixed(1)} s` : 'reconnecting…';
  }
  if (pill.textContent !== text) pill.textContent = text;
}

function setNotice(text) {
  const n = $('notice');
  n.hidden = !text;
  n.textContent = text ?? '';
}

function fmtBytes(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB/s`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB/s`;
  return `${n} B/s`;
}

function set(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function renderPanel() {
  set('s-transport', fc.transport ?? '—');
  set('s-cars', String(fc.cars));
  set('s-ticks', String(fc.ticksReceived));
  set('s-missed', String(fc.ticksMissed));
  set('s-latency', fc.latencyP50Ms === null ? '—' : `${fc.latencyP50Ms} ms`);
  set('s-rate', fmtBytes(fc.bytesPerSecond));
  renderToken();
  renderConn();
  if (fc.state !== 'connected' && fc.lastError && !$('notice').textContent) {
    setNotice(`Connection lost: ${fc.lastError}`);
  }
}

/** The token row of the stats panel: shown only when the server requires a token. */
function renderToken() {
  const row = $('s-token-row');
  const show = fc.tokenRequired === true;
  if (row.hidden === show) row.hidden = !show;
  if (!show) return;
  set('s-token', fc.tokenStatus ?? (token === null ? 'missing' : 'sent'));
}

const COMPASS = ['N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW'];

function renderDetails() {
  const box = $('details');
  const s = fc.selected !== null ? sprites.get(fc.selected) : null;
  const entry = s ? view.cars.get(s.id) : null;
  if (!s || !entry || !entry.sample || !view.hello) {
    box.hidden = true;
    return;
  }
  const q = view.hello.quant;
  const smp = entry.sample;
  const hdg = headingDeg(smp.heading);
  const { lat, lon } = toLatLon(q, smp.x * q.unit_m, smp.y * q.unit_m);
  box.hidden = false;
  set('d-label', entry.label);
  set('d-id', String(entry.id));
  set('d-speed', `${(speedMps(q, smp.speed) * 3.6).toFixed(1)} km/h`);
  set('d-heading', `${hdg.toFixed(1)}° ${COMPASS[Math.round(hdg / 45) % 8]}`);
  set('d-pos', `${lat.toFixed(5)}, ${lon.toFixed(5)}`);
  set('d-age', `${ageS(smp.age).toFixed(1)} s`);
  set('d-tick', String(entry.tick));
}

// ---- Drawing -----------------------------------------------------------------------------

const canvas = $('map');
const ctx = canvas.getContext('2d');
let layout = { w: 0, h: 0, dpr: 1, scale: 1, ox: 0, oy: 0, area: 4000 };
let roadLayer = null;
let hover = null;

/** Width and height of the served area in metres: from the Hello's bounds, else the roads. */
function areaBox() {
  const b = view.hello?.bounds ?? lastBounds;
  if (b) {
    const h = (b.north - b.south) * METRES_PER_DEGREE;
    const w = (b.east - b.west) * METRES_PER_DEGREE * Math.cos((b.south * Math.PI) / 180);
    return { w, h };
  }
  const side = roads?.area_m ?? (view.hello ? 65535 * view.hello.quant.unit_m : 4000);
  return { w: side, h: side };
}

/** Side of the square the map frames, metres. */
function area() {
  const { w, h } = areaBox();
  return Math.max(w, h);
}

function resize() {
  const dpr = Math.min(window.devicePixelRatio || 1, 3);
  const w = window.innerWidth;
  const h = window.innerHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const a = area();
  const margin = Math.max(12, Math.min(w, h) * 0.04);
  const scale = Math.min((w - 2 * margin) / a, (h - 2 * margin) / a);
  layout = { w, h, dpr, scale, ox: (w - a * scale) / 2, oy: (h + a * scale) / 2, area: a };
  roadLayer = null;
}

const toScreen = (e, n) => [layout.ox + e * layout.scale, layout.oy - n * layout.scale];

function drawRoads() {
  const layer = document.createElement('canvas');
  layer.width = canvas.width;
  layer.height = canvas.height;
  const c = layer.getContext('2d');
  c.scale(layout.dpr, layout.dpr);
  const { w, h } = areaBox();
  const [x0, y0] = toScreen(0, h);
  c.fillStyle = '#111820';
  c.fillRect(x0, y0, w * layout.scale, h * layout.scale);
  c.lineCap = 'round';
  for (const r of roads?.roads ?? []) {
    const major = r.limit_mps >= 14;
    c.strokeStyle = major ? '#3a4654' : '#26303b';
    c.lineWidth = Math.max(major ? 3 : 1.5, (major ? 14 : 8) * layout.scale);
    c.beginPath();
    c.moveTo(...toScreen(r.a[0], r.a[1]));
    c.lineTo(...toScreen(r.b[0], r.b[1]));
    c.stroke();
  }
  roadLayer = layer;
}

function carColour(speedMpsValue) {
  // Slow = warm, fast = cool; always saturated so cars stand out from the grey roads.
  const hue = Math.max(0, Math.min(200, speedMpsValue * 12));
  return `hsl(${hue} 90% 58%)`;
}

function angleLerp(from, to, k) {
  const d = ((to - from + 540) % 360) - 180;
  return from + d * k;
}

let lastFrame = nowS();

function frame() {
  const t = nowS();
  const dt = Math.min(0.25, t - lastFrame);
  lastFrame = t;
  if (layout.area !== area() || canvas.width !== Math.round(window.innerWidth * layout.dpr)) resize();
  if (!roadLayer) drawRoads();
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = '#0d1117';
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(roadLayer, 0, 0);
  ctx.setTransform(layout.dpr, 0, 0, layout.dpr, 0, 0);

  const q = view.hello?.quant ?? lastQuant;
  // While disconnected the cars are last known positions: draw them dimmed.
  ctx.globalAlpha = fc.connected ? 1 : 0.4;
  const size = Math.max(5, Math.min(14, 9 * layout.scale * 2 + 4));
  const labels = sprites.size <= LABELS_UP_TO;
  ctx.font = `${Math.round(Math.max(10, size * 0.95))}px system-ui, sans-serif`;
  ctx.textBaseline = 'middle';
  let drawn = 0;
  const labelQueue = [];
  for (const s of sprites.values()) {
    const p = position(s, t);
    s.drawnHdg = angleLerp(s.drawnHdg, s.hdg, 1 - Math.exp(-dt / 0.2));
    const [x, y] = toScreen(p.e, p.n);
    s.screen = [x, y];
    if (x < -20 || y < -20 || x > layout.w + 20 || y > layout.h + 20) continue;
    drawn += 1;
    const v = q && s.entry.sample ? speedMps(q, s.entry.sample.speed) : 0;
    const picked = s.id === fc.selected || s.id === hover;
    ctx.save();
    ctx.translate(x, y);
    ctx.rotate((s.drawnHdg * Math.PI) / 180);
    ctx.beginPath();
    ctx.moveTo(0, -size);
    ctx.lineTo(size * 0.62, size * 0.7);
    ctx.lineTo(0, size * 0.35);
    ctx.lineTo(-size * 0.62, size * 0.7);
    ctx.closePath();
    ctx.fillStyle = carColour(v);
    ctx.fill();
    ctx.lineWidth = picked ? 2.5 : 1;
    ctx.strokeStyle = picked ? '#ffffff' : 'rgba(0,0,0,0.6)';
    ctx.stroke();
    ctx.restore();
    if (picked) labelQueue.unshift([s, x, y, true]);
    else if (labels) labelQueue.push([s, x, y, false]);
  }
  // Labels go where they do not overlap one already placed (the picked car's first).
  const placed = [];
  const lh = Math.round(Math.max(10, size * 0.95)) + 2;
  for (const [s, x, y, picked] of labelQueue) {
    const w = ctx.measureText(s.entry.label).width;
    // Right of the car, or left of it where the right would leave the screen.
    const left = x + size + 3 + w > layout.w - 4 ? x - size - 3 - w : x + size + 3;
    const r = [left, y - lh / 2, left + w, y + lh / 2];
    if (!picked && placed.some((o) => r[0] < o[2] && r[2] > o[0] && r[1] < o[3] && r[3] > o[1])) {
      continue;
    }
    placed.push(r);
    ctx.fillStyle = picked ? '#ffffff' : 'rgba(230,237,243,0.85)';
    ctx.fillText(s.entry.label, r[0], y);
  }
  ctx.globalAlpha = 1;
  fc.carsDrawn = drawn;
  refreshStats();
  renderPanel();
  renderDetails();
  requestAnimationFrame(frame);
}

function pick(clientX, clientY) {
  let best = null;
  let bestD = 22 * 22;
  for (const s of sprites.values()) {
    if (!s.screen) continue;
    const dx = s.screen[0] - clientX;
    const dy = s.screen[1] - clientY;
    const d = dx * dx + dy * dy;
    if (d < bestD) {
      bestD = d;
      best = s.id;
    }
  }
  return best;
}

canvas.addEventListener('pointermove', (ev) => {
  hover = pick(ev.clientX, ev.clientY);
  canvas.style.cursor = hover === null ? 'crosshair' : 'pointer';
  if (hover !== null && ev.pointerType === 'mouse') fc.selected = fc.pinned ?? hover;
  else if (ev.pointerType === 'mouse') fc.selected = fc.pinned ?? null;
});
canvas.addEventListener('click', (ev) => {
  const id = pick(ev.clientX, ev.clientY);
  fc.pinned = id;
  fc.selected = id;
});
$('details-close').addEventListener('click', () => {
  fc.pinned = null;
  fc.selected = null;
});
window.addEventListener('resize', resize);

resize();
requestAnimationFrame(frame);
main();
