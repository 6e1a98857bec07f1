// app.js: the web demo's drawing. fleetcast-client.js does the connecting; this file draws
// the roads and every car on a canvas, gliding between fixes (motion.js), and keeps the stats
// panel, the details card and the car list (the keyboard's and screen readers' way to the
// cars) up to date. State for people and tests: window.fleetcast (docs/web-demo.md).
//
// The page's address may say ?server=, ?transport= and ?token= (page-options.js).

import { connect } from './fleetcast-client.js';
import { pageOptions } from './page-options.js';
import { followCars, horizonS, localProjection, turnTowards, METRES_PER_DEGREE } from './motion.js';
import { fetchRoads, roadsToGeoJSON } from './roads.js';
import { LEGEND_KMH, kmh, compass, headingText, fixAgeText, carColour } from './car-format.js';

const LABELS_UP_TO = 400;
const REFUSED = 'refused (token missing, invalid or expired?)';

const $ = (id) => document.getElementById(id);
const options = pageOptions(location.search);
let fleet;
try {
  fleet = connect(options);
} catch (e) {
  // A bad ?server= or ?transport=: say so on the page.
  $('notice').hidden = false;
  $('notice').textContent = e.message;
  throw e;
}

// ---- Render state per car ----------------------------------------------------------------

/** id -> {car (as fleetcast-client.js gives it), glide, drawnHdg, screen} */
const sprites = new Map();
/** Degrees <-> metres on the map, from the served area's south-west corner. */
let projection = null;
let projectionFrom = null;
/** The road network as GeoJSON (roads.js), drawn once into `roadLayer`. */
let roads = null;
let fetchingRoads = false;
let roadLayer = null;
let selected = null;
let pinned = null;
let hover = null;
/** When the next attempt starts (performance.now() ms), for the countdown, or null. */
let retryAt = null;
let lastAnnounced = null;

const nowS = () => performance.now() / 1000;

function ensureProjection() {
  const from = fleet.area ? [fleet.area.south, fleet.area.west] : null;
  if (from === null) return null;
  if (projectionFrom === null || from[0] !== projectionFrom[0] || from[1] !== projectionFrom[1]) {
    projection = localProjection(from[0], from[1]);
    projectionFrom = from;
    sprites.clear(); // their metres were of another origin: the next tick places them again
    roadLayer = null;
  }
  return projection;
}

/** Takes the cars of a tick event: new fixes glide in, cars that left disappear. */
function onTick(cars) {
  const proj = ensureProjection();
  if (!proj) return;
  followCars(sprites, cars, proj, nowS(), horizonS(fleet.tickIntervalMs), {
    create: (car, glide) => ({ car, glide, drawnHdg: car.headingDeg, screen: null }),
  });
  if (selected !== null && !sprites.has(selected)) select(null);
  renderCarList();
  renderSummary();
  if (roads === null && !fetchingRoads) {
    fetchingRoads = true;
    fetchRoads(fleet.server).then((r) => {
      roads = r && roadsToGeoJSON(r);
      roadLayer = null;
    });
  }
}

fleet.addEventListener('tick', (e) => onTick(e.detail.cars));
fleet.addEventListener('state', (e) => onState(e.detail));

// ---- Stats -------------------------------------------------------------------------------

/** [seconds, bytesReceived] once a second over the last 5 s: a fixed size, hidden or not. */
const byteSamples = [];
let bytesPerSecond = 0;
setInterval(() => {
  byteSamples.push([nowS(), fleet.stats.bytesReceived]);
  if (byteSamples.length > 6) byteSamples.shift();
  const [t0, b0] = byteSamples[0];
  const [t1, b1] = byteSamples.at(-1);
  bytesPerSecond = t1 > t0 ? Math.round((b1 - b0) / (t1 - t0)) : 0;
}, 1000);

/** The token row's text: null when the server requires none. */
function tokenStatus(stats) {
  if (stats.tokenRequired !== true) return null;
  if (stats.token === 'refused') return REFUSED;
  return stats.token === 'missing' ? 'missing' : stats.token;
}

/** Live state for people and tests. */
const fc = {
  get transport() { return fleet.transport; },
  get connected() { return fleet.transport !== null; },
  get state() { return fleet.state; },
  get server() { return fleet.server; },
  get cars() { return sprites.size; },
  carsDrawn: 0,
  get bytesPerSecond() { return bytesPerSecond; },
  tokenGiven: typeof options.token === 'string',
  get tokenStatus() { return tokenStatus(fleet.stats); },
  get selected() { return selected; },
  get pinned() { return pinned; },
  /** Every car on the map: the library's car plus where it was last drawn (CSS pixels). */
  carList: () => [...sprites.values()].map((s) => ({ ...s.car, screen: s.screen })),
};
// The library's counters, read when asked for.
for (const key of ['initialCars', 'ticksReceived', 'ticksMissed', 'ticksComplete', 'tick', 'latencyP50Ms',
  'sessions', 'reconnects', 'badDatagrams', 'lastClose', 'lastGoodbye', 'lastError', 'unsupportedVersion',
  'fallbackReason', 'certificateHashes', 'tokenRequired']) {
  Object.defineProperty(fc, key, { get: () => fleet.stats[key], enumerable: true });
}
window.fleetcast = fc;

// ---- Connection state, notices and the announcer -------------------------------------------

function onState(d) {
  // The status pill is a live region: it changes only with the state, never with a countdown.
  const text = {
    connecting: 'connecting…',
    live: `live · ${d.transport === 'webtransport' ? 'WebTransport' : 'WebSocket'}`,
    stale: 'stale · no recent data',
    reconnecting: 'reconnecting',
    paused: 'paused (page hidden)',
    offline: 'offline',
  }[d.state];
  const pill = $('conn');
  pill.dataset.state = d.state;
  if (pill.textContent !== text) pill.textContent = text;
  retryAt = d.state === 'reconnecting' && d.retryInMs ? performance.now() + d.retryInMs : null;
  const stats = fleet.stats;
  if (d.state === 'live') {
    setNotice(stats.fallbackReason && d.transport === 'websocket' ? `WebSocket fallback: ${stats.fallbackReason}` : null);
  } else if (stats.unsupportedVersion) {
    setNotice(`This page cannot read this server: ${stats.unsupportedVersion}. Reload the page.`);
  } else if (stats.token === 'refused') {
    setNotice(fc.tokenGiven
      ? 'The server refused the session: the token may be invalid or expired.'
      : 'This server requires a subscriber token: open the page with ?\u2060token=…');
  } else if (stats.lastGoodbye?.code === 1) {
    setNotice('Server restarting — will reconnect.');
  } else if (d.state === 'reconnecting' && stats.lastError) {
    setNotice(`Connection lost: ${stats.lastError}`);
  }
  renderSummary();
}

/** The canvas's text alternative (not a live region: it may change as often as it likes). */
function renderSummary() {
  set('map-summary', `${sprites.size} cars, ${fleet.state}. The car list under the stats names every car with its speed; choose one for its details.`);
}

function setNotice(text) {
  const n = $('notice');
  n.hidden = !text;
  if (n.textContent !== (text ?? '')) n.textContent = text ?? '';
}

/** Says `text` once through the polite announcer (not a region that changes every frame). */
function announce(text) {
  if (text === lastAnnounced) return;
  lastAnnounced = text;
  $('announce').textContent = text;
}

// ---- Panel, details and the car list ----------------------------------------------------

function set(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function fmtBytes(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB/s`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB/s`;
  return `${n} B/s`;
}

function renderPanel() {
  const stats = fleet.stats;
  set('s-transport', fleet.transport ?? '—');
  set('s-cars', String(sprites.size));
  set('s-ticks', String(stats.ticksReceived));
  set('s-missed', String(stats.ticksMissed));
  set('s-latency', stats.latencyP50Ms === null ? '—' : `${stats.latencyP50Ms} ms`);
  set('s-rate', fmtBytes(bytesPerSecond));
  const token = tokenStatus(stats);
  const row = $('s-token-row');
  if (row.hidden !== (token === null)) row.hidden = token === null;
  if (token !== null) set('s-token', token);
  const s = retryAt === null ? 0 : (retryAt - performance.now()) / 1000;
  set('conn-retry', s > 0.05 ? `in ${s.toFixed(1)} s` : '');
}

function renderDetails() {
  const box = $('details');
  const s = selected !== null ? sprites.get(selected) : null;
  if (!s) {
    box.hidden = true;
    return;
  }
  const car = s.car;
  box.hidden = false;
  set('d-label', car.label);
  set('d-id', String(car.id));
  set('d-speed', `${(car.speedMps * 3.6).toFixed(1)} km/h`);
  set('d-heading', headingText(car.headingDeg));
  set('d-pos', `${car.lat.toFixed(5)}, ${car.lon.toFixed(5)}`);
  // The time since the fix, counting on between ticks (not the age the wire gave at its tick).
  set('d-age', fixAgeText(car, Date.now()));
  set('d-tick', String(car.tick));
}

function select(id, { pin = false, say = false } = {}) {
  selected = id;
  if (pin) pinned = id;
  const car = id === null ? null : sprites.get(id)?.car;
  if (say && car) {
    announce(`${car.label}: ${kmh(car.speedMps)}, heading ${compass(car.headingDeg)}`);
  }
}

/** The car list: one button per car, rebuilt only when the roster changes. */
let listedKey = '';
function renderCarList() {
  const list = $('car-list');
  const cars = [...sprites.values()].map((s) => s.car).sort((a, b) => a.label.localeCompare(b.label));
  set('car-count', String(cars.length));
  const key = cars.map((c) => `${c.id}:${c.label}`).join('|');
  const rebuilt = key !== listedKey;
  if (rebuilt) {
    listedKey = key;
    list.replaceChildren(...cars.map((c) => {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.id = String(c.id);
      b.append(c.label, ' ', Object.assign(document.createElement('span'), { className: 'speed' }));
      li.append(b);
      return li;
    }));
  }
  // Speeds change every tick: written only while the list is open (and once when built).
  if (!$('car-list-panel').open && !rebuilt) return;
  for (const b of list.querySelectorAll('button')) {
    const car = sprites.get(Number(b.dataset.id))?.car;
    const span = b.querySelector('.speed');
    const text = car ? kmh(car.speedMps) : '';
    if (span.textContent !== text) span.textContent = text;
    b.setAttribute('aria-pressed', String(Number(b.dataset.id) === selected));
  }
}

$('car-list').addEventListener('click', (ev) => {
  const b = ev.target.closest('button[data-id]');
  if (b) select(Number(b.dataset.id), { pin: true, say: true });
  renderCarList();
});
$('car-list-panel').addEventListener('toggle', renderCarList);
$('details-close').addEventListener('click', () => {
  pinned = null;
  select(null);
});
document.addEventListener('keydown', (ev) => {
  if (ev.key === 'Escape' && selected !== null) {
    pinned = null;
    select(null);
  }
});

function renderLegend() {
  const bar = $('legend-bar');
  bar.style.background = `linear-gradient(to right, ${LEGEND_KMH.map((k) => carColour(k / 3.6)).join(', ')})`;
  $('legend-ticks').replaceChildren(...LEGEND_KMH.map((k) => Object.assign(document.createElement('span'), { textContent: String(k) })));
}

// ---- Drawing -----------------------------------------------------------------------------

const canvas = $('map');
const ctx = canvas.getContext('2d');
let layout = { w: 0, h: 0, dpr: 1, scale: 1, ox: 0, oy: 0, area: 4000 };

/** Width and height of the served area in metres. */
function areaBox() {
  const b = fleet.area;
  if (!b) return { w: 4000, h: 4000 };
  const h = (b.north - b.south) * METRES_PER_DEGREE;
  const w = (b.east - b.west) * METRES_PER_DEGREE * Math.cos((b.south * Math.PI) / 180);
  return { w, h };
}

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

/** Screen position (CSS pixels) of a point in metres east and north of the area's corner. */
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
  const proj = ensureProjection();
  for (const road of proj ? roads?.features ?? [] : []) {
    const { major } = road.properties;
    c.strokeStyle = major ? '#3a4654' : '#26303b';
    c.lineWidth = Math.max(major ? 3 : 1.5, (major ? 14 : 8) * layout.scale);
    c.beginPath();
    for (const [i, [lon, lat]] of road.geometry.coordinates.entries()) {
      const m = proj.toMetres(lat, lon);
      c[i === 0 ? 'moveTo' : 'lineTo'](...toScreen(m.e, m.n));
    }
    c.stroke();
  }
  roadLayer = layer;
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

  // Without live data the cars are last known positions: draw them dimmed.
  ctx.globalAlpha = fleet.state === 'live' ? 1 : 0.4;
  const size = Math.max(5, Math.min(14, 9 * layout.scale * 2 + 4));
  const labels = sprites.size <= LABELS_UP_TO;
  ctx.font = `${Math.round(Math.max(10, size * 0.95))}px system-ui, sans-serif`;
  ctx.textBaseline = 'middle';
  let drawn = 0;
  const labelQueue = [];
  for (const s of sprites.values()) {
    const p = s.glide.at(t);
    s.drawnHdg = turnTowards(s.drawnHdg, s.car.headingDeg, 1 - Math.exp(-dt / 0.2));
    const [x, y] = toScreen(p.e, p.n);
    s.screen = [x, y];
    if (x < -20 || y < -20 || x > layout.w + 20 || y > layout.h + 20) continue;
    drawn += 1;
    const picked = s.car.id === selected || s.car.id === hover;
    ctx.save();
    ctx.translate(x, y);
    ctx.rotate((s.drawnHdg * Math.PI) / 180);
    ctx.beginPath();
    ctx.moveTo(0, -size);
    ctx.lineTo(size * 0.62, size * 0.7);
    ctx.lineTo(0, size * 0.35);
    ctx.lineTo(-size * 0.62, size * 0.7);
    ctx.closePath();
    ctx.fillStyle = carColour(s.car.speedMps);
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
    const text = picked ? `${s.car.label} · ${kmh(s.car.speedMps)}` : s.car.label;
    const w = ctx.measureText(text).width;
    // Right of the car, or left of it where the right would leave the screen.
    const left = x + size + 3 + w > layout.w - 4 ? x - size - 3 - w : x + size + 3;
    const r = [left, y - lh / 2, left + w, y + lh / 2];
    if (!picked && placed.some((o) => r[0] < o[2] && r[2] > o[0] && r[1] < o[3] && r[3] > o[1])) continue;
    placed.push(r);
    ctx.fillStyle = picked ? '#ffffff' : 'rgba(230,237,243,0.85)';
    ctx.fillText(text, r[0], y);
  }
  ctx.globalAlpha = 1;
  fc.carsDrawn = drawn;
  renderPanel();
  renderDetails();
  requestAnimationFrame(frame);
}

function pick(clientX, clientY) {
  let best = null;
  let bestD = 22 * 22;
  for (const s of sprites.values()) {
    if (!s.screen) continue;
    const d = (s.screen[0] - clientX) ** 2 + (s.screen[1] - clientY) ** 2;
    if (d < bestD) {
      bestD = d;
      best = s.car.id;
    }
  }
  return best;
}

canvas.addEventListener('pointermove', (ev) => {
  hover = pick(ev.clientX, ev.clientY);
  canvas.style.cursor = hover === null ? 'crosshair' : 'pointer';
  if (ev.pointerType === 'mouse') select(pinned ?? hover);
});
canvas.addEventListener('click', (ev) => select(pick(ev.clientX, ev.clientY), { pin: true }));
window.addEventListener('resize', resize);

renderLegend();
resize();
requestAnimationFrame(frame);
