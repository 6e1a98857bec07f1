// fleetcast-session.js: one session, bytes in, the fleet out. Pure: no sockets, no timers and
// no clock of its own; callers pass `now` (a monotonic time in ms, performance.now()) and
// `wallNow` (Date.now()). A new session (a reconnection, another node) starts a new
// FleetSession: tick numbers and rosters are per session (PROTOCOL.md section 7).
//
// It decodes the reliable stream and the datagrams (fleetcast-wire.js), checks the Hello's
// version, applies everything by the protocol's rules (FleetView: newest tick wins, partial
// ticks, roster events, samples of unknown ids held for their CarsAdded) and turns the view
// into plain car objects: degrees, metres per second, seconds.

import {
  FrameDecoder,
  FleetView,
  decodeDatagram,
  checkHello,
  toLatLon,
  headingDeg,
  speedMps,
  ageS,
  CloseCode,
} from './fleetcast-wire.js';

/** How many ticks the latency percentile looks back over. */
export const LATENCY_SAMPLES = 60;

/** One session's state: feed it what arrives, read cars out. */
export class FleetSession {
  constructor() {
    /** The protocol view (fleetcast-wire.js FleetView). */
    this.view = new FleetView();
    this.frames = new FrameDecoder();
    /** The server's Hello once read and accepted, else null. */
    this.hello = null;
    /** The server's Goodbye `{code, reason}`, if it sent one. */
    this.goodbye = null;
    /** Bytes received, stream and datagrams. */
    this.bytes = 0;
    /** Datagrams that did not decode (each is dropped; the session goes on). */
    this.badDatagrams = 0;
    /** The newest tick seen: `{tick, timeUs, at}` with its server time and local arrival. */
    this.newest = null;
    /** Milliseconds from a tick's server time to its first part's arrival, newest last. */
    this.latencies = [];
  }

  /** Whether the initial Roster and State have arrived: the cars are complete from here on. */
  get ready() {
    return this.hello !== null && this.view.initialCars !== null;
  }

  /**
   * Feeds reliable-stream bytes. Returns what they held: `{hello, fleet, goodbye}` (booleans;
   * `fleet` when the roster or the cars changed). Throws a DecodeError when the bytes do not
   * decode or the Hello's version is not ours: the session must then end with
   * `closeFor(error)`, and nothing more from it may be applied.
   */
  pushStream(bytes, now) {
    this.bytes += bytes.length;
    this.frames.push(bytes);
    const seen = { hello: false, fleet: false, goodbye: false };
    for (let m; (m = this.frames.next()) !== null; ) {
      if (m.type === 'Goodbye') {
        this.goodbye = { code: m.code, reason: m.reason };
        seen.goodbye = true;
        continue;
      }
      if (m.type === 'Hello') {
        this.hello = checkHello(m);
        seen.hello = true;
      } else {
        seen.fleet = true;
      }
      if (m.type === 'State' && typeof m.tick === 'number') this.noteTick(m.tick, m.time_us, now);
      this.view.applyMessage(m);
    }
    return seen;
  }

  /**
   * Feeds one datagram payload (WebTransport datagram, or a WebSocket message after its
   * channel byte). Returns `{tick, fresh, complete}` (`fresh`: the first part of a tick newer
   * than any seen; `complete`: every part of its tick has arrived), or null for a datagram
   * that did not decode, which is counted and dropped.
   */
  pushDatagram(bytes, now, wallNow) {
    this.bytes += bytes.length;
    let part;
    try {
      part = decodeDatagram(bytes);
    } catch {
      this.badDatagrams += 1;
      return null;
    }
    this.view.applyPart(part);
    if (typeof part.tick !== 'number') return { tick: null, fresh: false, complete: false };
    const fresh = this.noteTick(part.tick, part.time_us, now);
    if (fresh && typeof part.time_us === 'number') {
      this.latencies.push(wallNow - part.time_us / 1000);
      if (this.latencies.length > LATENCY_SAMPLES) this.latencies.shift();
    }
    return { tick: part.tick, fresh, complete: this.view.ticks.complete(part.tick) };
  }

  /** Remembers the newest tick; returns whether `tick` is newer than every one before. */
  noteTick(tick, timeUs, now) {
    if (this.newest !== null && tick <= this.newest.tick) return false;
    this.newest = { tick, timeUs: typeof timeUs === 'number' ? timeUs : 0, at: now };
    return true;
  }

  /** Median of the recent latencies in ms (one decimal), or null before any tick. */
  latencyP50() {
    if (!this.latencies.length) return null;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    return Math.round(sorted[Math.floor(sorted.length / 2)] * 10) / 10;
  }

  /**
   * Every car on the roster that has a position, as
   * `{id, label, lat, lon, headingDeg, speedMps, ageS, fixTimeMs, tick}`:
   * - `ageS`: seconds from the car's fix to `now`. The wire gives the fix's age at its tick;
   *   to it come the server time from that tick to the newest one and the local time since
   *   the newest arrived, so no clock is compared with the server's.
   * - `fixTimeMs`: when the fix was taken, on this machine's clock (`wallNow - ageS`).
   * - `tick`: the tick the car's sample came from.
   */
  cars(now, wallNow) {
    const q = this.hello?.quant;
    if (!q || this.newest === null) return [];
    const sinceNewest = Math.max(0, now - this.newest.at) / 1000;
    const out = [];
    for (const e of this.view.cars.values()) {
      const s = e.sample;
      if (s === null) continue;
      const { lat, lon } = toLatLon(q, s.x * q.unit_m, s.y * q.unit_m);
      const behind = Math.max(0, this.newest.timeUs - e.time_us) / 1e6;
      const age = ageS(s.age) + behind + sinceNewest;
      out.push({
        id: e.id,
        label: e.label,
        lat,
        lon,
        headingDeg: headingDeg(s.heading),
        speedMps: speedMps(q, s.speed),
        ageS: age,
        fixTimeMs: wallNow - age * 1000,
        tick: e.tick,
      });
    }
    return out;
  }
}

/**
 * How a client ends a session after `error` was thrown while applying it: `{code, reason}`
 * with the protocol's close code (PROTOCOL.md section 8.1): 5 for a Hello version this client
 * does not speak, 2 for bytes that do not decode, 0 for anything else.
 */
export function closeFor(error) {
  if (error?.kind === 'UnsupportedVersion') {
    return { code: CloseCode.UnsupportedVersion, reason: 'unsupported protocol version' };
  }
  if (error?.name === 'DecodeError') {
    return { code: CloseCode.ProtocolViolation, reason: 'protocol violation' };
  }
  return { code: CloseCode.Normal, reason: 'client error' };
}
