// fleetcast-client.js: live fleet positions from a fleetcast server, for any web page. A
// standalone ES module, no dependencies, no build step:
//
//   import { connect } from './fleetcast-client.js';
//   const fleet = connect({ server: 'https://fleet.example.com', transport: 'auto', token });
//   fleet.addEventListener('tick', (e) => draw(e.detail.cars));
//   fleet.addEventListener('state', (e) => show(e.detail));
//   fleet.close();
//
// It owns the connection: each node's /config.json and certificate hashes, WebTransport with
// the WebSocket fallback, reconnecting with jittered backoff over one or several server URLs,
// subscriber tokens, the protocol's apply rules, a staleness signal, a pause while the page is
// hidden and the Hello's version check. docs/web-demo.md documents the API;
// fleetcast-client.d.ts declares it.
//
// Layout: fleetcast-servers.js (URLs, config, hashes), fleetcast-transport.js (opening and
// reading a session), fleetcast-session.js (bytes in, cars out; pure), fleetcast-wire.js
// (the decoder and the apply rules), backoff.js (the reconnect schedule).

import { PROTOCOL_VERSION } from './fleetcast-wire.js';
import { retryDelayMs } from './backoff.js';
import { FleetSession } from './fleetcast-session.js';
import { openWebTransport, openWebSocket, within } from './fleetcast-transport.js';
import {
  serverList,
  mergeServers,
  withToken,
  webTransportUrl,
  webSocketUrl,
  fetchConfig,
  fetchCertificateHashes,
} from './fleetcast-servers.js';

export { PROTOCOL_VERSION };

/** Every value of `FleetConnection.state`, in the order a connection usually meets them. */
export const STATES = Object.freeze(['connecting', 'live', 'stale', 'reconnecting', 'paused', 'offline']);

/** The options `connect` takes, with their defaults. */
export const DEFAULTS = Object.freeze({
  /** Base URL(s) of the server's HTTP side; default: where the page came from (its directory). */
  server: null,
  /** 'auto' (WebTransport, else the WebSocket), 'webtransport' or 'websocket'. */
  transport: 'auto',
  /** Subscriber token: a string, null, or a function returning one (called per attempt). */
  token: null,
  /** Longest wait for a fetch or a session to open, ms. */
  openTimeoutMs: 5000,
  /** No tick for this long on an open session: state 'stale'. null: 3 tick intervals. */
  staleAfterMs: null,
  /** No tick for this long: the session is given up and opened again. null: 10 intervals, at least 10 s. */
  deadAfterMs: null,
  /** Ms the page may stay hidden before the session pauses; false: never pause. */
  pauseWhenHidden: 5000,
});

const TRANSPORTS = ['auto', 'webtransport', 'websocket'];
/** Wait before a new tick event when a tick's parts are still missing, ms. */
const PART_SETTLE_MS = 50;

/** Opens a connection to a fleetcast server; see FleetConnection. Throws TypeError on bad options. */
export function connect(options = {}) {
  return new FleetConnection(options);
}

/** `options` completed with DEFAULTS; throws a TypeError naming what is wrong. */
function checkOptions(options) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError('fleetcast: connect() takes an options object');
  }
  for (const key of Object.keys(options)) {
    if (!(key in DEFAULTS)) {
      throw new TypeError(`fleetcast: unknown option "${key}" (known: ${Object.keys(DEFAULTS).join(', ')})`);
    }
  }
  const o = { ...DEFAULTS, ...options };
  if (!TRANSPORTS.includes(o.transport)) {
    throw new TypeError(`fleetcast: transport must be one of ${TRANSPORTS.join(', ')}, not ${JSON.stringify(o.transport)}`);
  }
  if (o.token !== null && typeof o.token !== 'string' && typeof o.token !== 'function') {
    throw new TypeError('fleetcast: token must be a string, null or a function');
  }
  const positive = (key, nullable) => {
    const v = o[key];
    if (nullable && v === null) return;
    if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) {
      throw new TypeError(`fleetcast: ${key} must be a positive number of milliseconds${nullable ? ' or null' : ''}`);
    }
  };
  positive('openTimeoutMs', false);
  positive('staleAfterMs', true);
  positive('deadAfterMs', true);
  if (o.pauseWhenHidden !== false && (typeof o.pauseWhenHidden !== 'number' || !(o.pauseWhenHidden >= 0))) {
    throw new TypeError('fleetcast: pauseWhenHidden must be a number of milliseconds or false');
  }
  const base = globalThis.location?.href;
  if (o.server === null && base === undefined) {
    throw new TypeError('fleetcast: give `server` (there is no page address to default to)');
  }
  // Default: the server that served the page (its directory, so a path prefix is kept).
  o.servers = serverList(o.server ?? new URL('.', base).href, base);
  return o;
}

/**
 * A live connection to a fleetcast deployment (an EventTarget).
 *
 * Events:
 * - `tick`: the fleet changed; `detail` is `{tick, cars, transport, server}` with every car
 *   that has a position (see FleetSession.cars in fleetcast-session.js).
 * - `state`: `detail` is `{state, transport, server, reason, retryInMs}`; `state` is one of
 *   STATES: `connecting` (first attempt), `live` (a session is open and ticks arrive), `stale`
 *   (a session is open but no tick came for staleAfterMs), `reconnecting` (waiting
 *   `retryInMs` or trying again), `paused` (the page is hidden), `offline` (closed, or no
 *   server this client can read: nothing more will happen).
 */
export class FleetConnection extends EventTarget {
  #o;
  #servers;
  #index;
  /** Servers whose protocol version this client does not speak. */
  #unreadable = new Set();
  #state = 'connecting';
  #detail = null;
  /** The session applying data now, and the newest one that reached its initial state. */
  #session = null;
  #shown = null;
  #conn = null;
  #transport = null;
  #server = null;
  #config = null;
  #abort = null;
  /** Why this side is ending the current session (pause, silence, close), or null. */
  #ending = null;
  #closed = false;
  #paused = false;
  #wake = null;
  #timers = { hidden: null, silence: null, emit: null };
  #lastTickAt = 0;
  #earlier = { received: 0, missed: 0, complete: 0, bytes: 0, badDatagrams: 0 };
  #stats = {
    sessions: 0,
    reconnects: 0,
    lastClose: null,
    lastGoodbye: null,
    lastError: null,
    fallbackReason: null,
    certificateHashes: 0,
    tokenRequired: null,
    token: null,
    unsupportedVersion: null,
  };

  constructor(options) {
    super();
    this.#o = checkOptions(options);
    this.#servers = this.#o.servers;
    this.#index = Math.floor(Math.random() * this.#servers.length); // spread pages over nodes
    if (typeof document !== 'undefined') {
      document.addEventListener('visibilitychange', this.#onVisibility);
      if (document.visibilityState === 'hidden') this.#onVisibility();
    }
    // From the next microtask, so listeners added right after connect() see 'connecting'.
    Promise.resolve().then(() => this.#run()).catch((e) => {
      // A bug, not a network condition: say so instead of failing silently.
      this.#stats.lastError = `fleetcast-client: ${e?.stack ?? e}`;
      this.#closed = true;
      this.#setState('offline', { reason: this.#stats.lastError });
    });
  }

  /** One of STATES. */
  get state() {
    return this.#state;
  }

  /** 'webtransport' or 'websocket' while a session is open, else null. */
  get transport() {
    // Null from the moment close() is called, not once the transport has finished closing.
    return this.#conn && !this.#closed ? this.#transport : null;
  }

  /** Base URL of the node of the current (or the last) session. */
  get server() {
    return this.#server;
  }

  /** Base URLs this connection may use: the given ones, then those /config.json named. */
  get servers() {
    return [...this.#servers];
  }

  /** Every car with a position, as in the `tick` event (the last session's while reconnecting). */
  get cars() {
    return this.#shown ? this.#shown.cars(performance.now(), Date.now()) : [];
  }

  /** The served area `{south, west, north, east}` in degrees, once a server said it. */
  get area() {
    return this.#shown?.hello?.bounds ?? null;
  }

  /** The server's nominal tick interval in ms, once known. */
  get tickIntervalMs() {
    return this.#shown?.hello?.tick_interval_ms ?? this.#config?.tickIntervalMs ?? null;
  }

  /**
   * Counters over every session so far: sessions, reconnects, ticksReceived, ticksMissed,
   * ticksComplete, bytesReceived, badDatagrams, latencyP50Ms, initialCars, tick, lastClose,
   * lastGoodbye, lastError, fallbackReason, certificateHashes, tokenRequired, token
   * (null | 'missing' | 'sent' | 'accepted' | 'refused', which stays until a session opens),
   * unsupportedVersion.
   */
  get stats() {
    const s = this.#session;
    const c = s?.view.counts ?? { received: 0, missed: 0, complete: 0 };
    return {
      ...this.#stats,
      ticksReceived: this.#earlier.received + c.received,
      ticksMissed: this.#earlier.missed + c.missed,
      ticksComplete: this.#earlier.complete + c.complete,
      bytesReceived: this.#earlier.bytes + (s?.bytes ?? 0),
      badDatagrams: this.#earlier.badDatagrams + (s?.badDatagrams ?? 0),
      latencyP50Ms: this.#shown?.latencyP50() ?? null,
      initialCars: this.#shown?.view.initialCars ?? null,
      tick: this.#shown?.newest?.tick ?? null,
    };
  }

  /** Ends the session and stops for good (state 'offline'). */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#endSession('closed by the page');
    for (const t of Object.values(this.#timers)) clearTimeout(t);
    if (typeof document !== 'undefined') document.removeEventListener('visibilitychange', this.#onVisibility);
    this.#setState('offline', { reason: 'closed' });
  }

  // ---- The loop: one attempt after another ------------------------------------------------

  async #run() {
    let failures = 0; // attempts in a row that brought no data
    let afterSession = false;
    while (!this.#closed) {
      if (this.#paused) {
        await this.#sleep(Infinity);
        failures = 0;
        afterSession = false;
        continue;
      }
      // After a session: a jittered pause so pages that lost a server together come back
      // spread out. After failures: try every server once at once, then back off per round.
      const n = this.#servers.length;
      let wait = 0;
      if (afterSession) wait = retryDelayMs(0, Math.random());
      else if (failures > 0 && failures % n === 0) wait = retryDelayMs(failures / n, Math.random());
      if (wait > 0) {
        this.#setState('reconnecting', { retryInMs: Math.round(wait), reason: this.#stats.lastError });
        await this.#sleep(wait);
        if (this.#paused || this.#closed) continue;
      }
      const server = this.#servers[this.#index];
      if (this.#stats.sessions > 0 || failures > 0) this.#stats.reconnects += 1;
      this.#setState(this.#stats.sessions > 0 || failures > 0 ? 'reconnecting' : 'connecting', { server });
      const outcome = await this.#attempt(server);
      if (this.#closed) break;
      if (outcome === 'paused') continue;
      if (outcome === 'unreadable') {
        this.#unreadable.add(server);
        if (this.#servers.every((s) => this.#unreadable.has(s))) {
          this.#setState('offline', { reason: this.#stats.unsupportedVersion });
          return;
        }
      }
      afterSession = outcome === 'data';
      failures = afterSession ? 0 : failures + 1;
      this.#advance();
    }
  }

  /** Moves to the next server this client can read (round robin). */
  #advance() {
    const n = this.#servers.length;
    for (let i = 1; i <= n; i += 1) {
      const next = (this.#index + i) % n;
      if (!this.#unreadable.has(this.#servers[next])) {
        this.#index = next;
        return;
      }
    }
  }

  /** Sleeps `ms` or until woken (pause, resume, close). */
  #sleep(ms) {
    return new Promise((resolve) => {
      const timer = Number.isFinite(ms) ? setTimeout(resolve, ms) : null;
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    }).finally(() => { this.#wake = null; });
  }

  /**
   * One attempt on `server`: config, transport with fallback, then the session until it ends.
   * Resolves with 'data' (the session delivered), 'failed', 'unreadable' (a protocol version
   * this client does not speak) or 'paused'. Never rejects.
   */
  async #attempt(server) {
    const abort = new AbortController();
    this.#abort = abort;
    this.#server = server;
    const session = new FleetSession();
    this.#session = session;
    try {
      const conn = await this.#open(server, session, abort.signal);
      if (conn === 'unreadable') {
        this.#finishSession(session);
        return 'unreadable';
      }
      return await this.#runSession(conn, session);
    } catch (e) {
      if (!abort.signal.aborted) this.#stats.lastError = String(e?.message ?? e);
      this.#finishSession(session);
      return this.#paused ? 'paused' : 'failed';
    } finally {
      this.#abort = null;
    }
  }

  /**
   * Fetches the node's config and opens a session on it (with fallback). Resolves with the
   * open session, or 'unreadable' when the config names a protocol version this client does
   * not speak; throws when no transport opens.
   */
  async #open(server, session, signal) {
    const timed = (what, promise) => within(promise, { timeoutMs: this.#o.openTimeoutMs, signal, what });
    const fetchFn = (url, init) => fetch(url, init);
    const config = await timed('config.json', fetchConfig(fetchFn, server, signal));
    this.#config = config;
    this.#servers = mergeServers(this.#servers, config.servers);
    if (config.protocolVersion !== PROTOCOL_VERSION) {
      this.#stats.unsupportedVersion = `${server} speaks protocol version ${config.protocolVersion}; this client speaks ${PROTOCOL_VERSION}`;
      return 'unreadable';
    }
    this.#stats.tokenRequired = config.tokenRequired;
    const token = await this.#token();
    // 'refused' stays until a session opens: it is what the last attempt learnt.
    if (config.tokenRequired && this.#stats.token !== 'refused') this.#stats.token = token === null ? 'missing' : 'sent';
    const handlers = {
      timeoutMs: this.#o.openTimeoutMs,
      signal,
      onStream: (bytes) => this.#onStream(session, bytes),
      onDatagram: (bytes) => this.#onDatagram(session, bytes),
    };
    const want = this.#o.transport;
    let fallback = null;
    if (want !== 'websocket') {
      if (typeof globalThis.WebTransport !== 'function') {
        fallback = 'this browser has no WebTransport';
      } else {
        try {
          const hashes = await timed('certificate.sha256', fetchCertificateHashes(fetchFn, server, signal));
          this.#stats.certificateHashes = hashes.length;
          const url = withToken(webTransportUrl(server, config), token);
          const conn = await openWebTransport(url, { ...handlers, hashes });
          this.#stats.fallbackReason = null;
          return conn;
        } catch (e) {
          if (signal.aborted) throw e;
          fallback = `WebTransport failed: ${e?.message ?? e}`;
        }
      }
      if (want === 'webtransport') throw new Error(fallback);
    } else {
      fallback = "transport: 'websocket' was asked for";
    }
    this.#stats.fallbackReason = fallback;
    try {
      return await openWebSocket(withToken(webSocketUrl(server, config), token), handlers);
    } catch (e) {
      // Browsers hide a refused session's status (401 on both transports for a bad token).
      if (config.tokenRequired && !signal.aborted) {
        this.#stats.token = 'refused';
        throw new Error('refused: the subscriber token may be missing, invalid or expired');
      }
      throw e;
    }
  }

  /** The token for the next attempt: the option's string, or what its function returns. */
  async #token() {
    const t = this.#o.token;
    const value = typeof t === 'function' ? await t() : t;
    if (value !== null && value !== undefined && typeof value !== 'string') {
      throw new TypeError('fleetcast: the token function must return a string or null');
    }
    return value ?? null;
  }

  /** Runs an open session until it ends; returns the attempt's outcome. */
  async #runSession(conn, session) {
    this.#conn = conn;
    this.#transport = conn.name;
    this.#ending = null;
    this.#stats.sessions += 1;
    this.#stats.lastGoodbye = null;
    if (this.#stats.tokenRequired) this.#stats.token = 'accepted';
    this.#lastTickAt = performance.now();
    this.#armSilence();
    this.#setState('live');
    const end = await conn.closed;
    this.#conn = null;
    clearTimeout(this.#timers.silence);
    this.#stats.lastClose = { code: end.code, reason: end.reason };
    this.#stats.lastGoodbye = session.goodbye;
    const hadData = session.ready || session.view.counts.received > 0;
    if (end.error) {
      this.#stats.lastError = `stream: ${end.error.message}`;
      if (end.error.kind === 'UnsupportedVersion') {
        this.#stats.unsupportedVersion = end.error.message;
        this.#finishSession(session);
        return 'unreadable';
      }
    } else if (this.#ending === null) {
      this.#stats.lastError = session.goodbye
        ? `the server ended the session: ${session.goodbye.reason}`
        : `session closed${end.code === null ? '' : ` (code ${end.code})`}: ${end.reason || 'no reason given'}`;
    }
    this.#finishSession(session);
    if (this.#paused && this.#ending !== null) return 'paused';
    return hadData ? 'data' : 'failed';
  }

  /** Adds an ended session's counters to the totals. */
  #finishSession(session) {
    if (this.#session !== session) return;
    session.view.finish();
    const c = session.view.counts;
    const e = this.#earlier;
    this.#earlier = {
      received: e.received + c.received,
      missed: e.missed + c.missed,
      complete: e.complete + c.complete,
      bytes: e.bytes + session.bytes,
      badDatagrams: e.badDatagrams + session.badDatagrams,
    };
    this.#session = null;
  }

  /** Ends the open session (or the attempt in progress) from this side, saying `why`. */
  #endSession(why) {
    this.#ending = why;
    this.#wake?.();
    this.#abort?.abort(new Error(why));
    this.#conn?.close(0, why);
  }

  // ---- What arrives --------------------------------------------------------------------------

  #onStream(session, bytes) {
    const seen = session.pushStream(bytes, performance.now());
    if (seen.fleet && session.ready) {
      if (this.#shown !== session) {
        this.#shown = session; // the initial state is complete: show this session's fleet
        this.#noteTick();
      }
      this.#emitSoon(0);
    }
  }

  #onDatagram(session, bytes) {
    const part = session.pushDatagram(bytes, performance.now(), Date.now());
    if (part === null || part.tick === null) return;
    if (part.fresh) this.#noteTick();
    if (!session.ready || this.#shown !== session) return;
    if (part.complete) this.#emit();
    else this.#emitSoon(PART_SETTLE_MS);
  }

  /** A tick arrived: the session is live again; restart the silence timers. */
  #noteTick() {
    this.#lastTickAt = performance.now();
    if (this.#state === 'stale') this.#setState('live');
    this.#armSilence();
  }

  #staleAfterMs() {
    return this.#o.staleAfterMs ?? 3 * (this.tickIntervalMs ?? 1000);
  }

  #deadAfterMs() {
    return this.#o.deadAfterMs ?? Math.max(10_000, 10 * (this.tickIntervalMs ?? 1000));
  }

  /** Arms the one timer that watches for silence: first 'stale', then giving the session up. */
  #armSilence() {
    clearTimeout(this.#timers.silence);
    if (this.#conn === null) return;
    const silent = performance.now() - this.#lastTickAt;
    const stale = this.#staleAfterMs();
    const dead = Math.max(this.#deadAfterMs(), stale);
    if (silent >= dead) {
      this.#stats.lastError = `no tick for ${Math.round(silent / 100) / 10} s`;
      this.#endSession(this.#stats.lastError);
      return;
    }
    if (silent >= stale && this.#state === 'live') {
      this.#setState('stale', { reason: `no tick for ${Math.round(silent / 100) / 10} s` });
    }
    const next = silent < stale ? stale - silent : dead - silent;
    this.#timers.silence = setTimeout(() => this.#armSilence(), Math.max(10, next));
  }

  #emitSoon(ms) {
    if (this.#timers.emit !== null) return;
    this.#timers.emit = setTimeout(() => this.#emit(), ms);
  }

  #emit() {
    clearTimeout(this.#timers.emit);
    this.#timers.emit = null;
    const s = this.#shown;
    if (!s || this.#closed) return;
    const detail = { tick: s.newest?.tick ?? null, cars: s.cars(performance.now(), Date.now()), transport: this.#transport, server: this.#server };
    this.dispatchEvent(new CustomEvent('tick', { detail }));
  }

  #setState(state, { reason = null, retryInMs = null, server = this.#server } = {}) {
    const detail = { state, transport: this.transport, server, reason, retryInMs };
    const prev = this.#detail;
    this.#state = state;
    this.#detail = detail;
    if (prev && prev.state === state && prev.transport === detail.transport && prev.server === server &&
        prev.reason === reason && prev.retryInMs === retryInMs) return;
    this.dispatchEvent(new CustomEvent('state', { detail }));
  }

  // ---- The page's visibility -----------------------------------------------------------------

  #onVisibility = () => {
    if (this.#closed) return;
    if (document.visibilityState === 'hidden') {
      if (this.#o.pauseWhenHidden === false || this.#timers.hidden !== null) return;
      this.#timers.hidden = setTimeout(() => this.#pause(), this.#o.pauseWhenHidden);
    } else {
      clearTimeout(this.#timers.hidden);
      this.#timers.hidden = null;
      if (this.#paused) {
        this.#paused = false;
        this.#wake?.(); // a fresh session at once: the loop starts from the beginning
      }
    }
  };

  #pause() {
    this.#timers.hidden = null;
    if (this.#paused || this.#closed) return;
    this.#paused = true;
    this.#endSession('paused: the page is hidden');
    clearTimeout(this.#timers.emit);
    this.#timers.emit = null;
    this.#setState('paused', { reason: 'the page is hidden' });
  }
}
