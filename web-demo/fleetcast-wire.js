// fleetcast-wire.js: a standalone decoder for the fleetcast v1 wire format, and the client's
// view of the fleet (the same rules as crates/fleetcast-proto/src/view.rs). No dependencies, no
// build step:
//
//   import { decodeDatagram, FrameDecoder, FleetView } from './fleetcast-wire.js';
//
// Integers: u8/u16/u32 and u64 values up to Number.MAX_SAFE_INTEGER decode to Numbers; a u64
// above that decodes to a BigInt, never to a rounded Number. FleetView ignores (and counts) a
// tick number that is not a safe integer rather than doing inexact arithmetic on it.
//
// The golden vectors in crates/fleetcast-proto/tests/vectors/wire.json are checked against this
// file by tests/js/wire.test.mjs, and against the Rust encoder by
// crates/fleetcast-proto/tests/wire_vectors.rs.

/** Protocol version in Hello; also the first byte of every datagram. */
export const PROTOCOL_VERSION = 1;
/** First byte of every v1 datagram payload. */
export const DATAGRAM_VERSION = 1;
/** Largest reliable-stream frame body a decoder accepts, bytes. */
export const MAX_FRAME_LEN = 4 * 1024 * 1024;
/** Stream message tags defined in v1; frames with higher tags are skipped. */
export const STREAM_MESSAGE_TAGS = 6;
/** Ticks a datagram part may arrive late and still count towards its tick. */
export const REORDER_WINDOW = 3;
/** Ticks a sample of an id not on the roster is held for its roster event (view.rs). */
export const PENDING_TICKS = 8;
/** Most ids whose samples are held pending at once (view.rs). */
export const MAX_PENDING = 4096;
/** WebSocket fallback: channel byte of reliable-stream bytes. */
export const WS_CHANNEL_STREAM = 0x00;
/** WebSocket fallback: channel byte of one datagram payload. */
export const WS_CHANNEL_DATAGRAM = 0x01;

/** Close codes (QUIC application close and Goodbye.code). */
export const CloseCode = Object.freeze({
  Normal: 0,
  GoingAway: 1,
  ProtocolViolation: 2,
  SlowConsumer: 3,
  Internal: 4,
  UnsupportedVersion: 5,
});

const MESSAGE_TYPES = ['Hello', 'Roster', 'State', 'CarsAdded', 'CarsRemoved', 'Goodbye'];

/** Bytes from the network that cannot be decoded. `kind` names the reason. */
export class DecodeError extends Error {
  constructor(kind, message) {
    super(message ?? kind);
    this.name = 'DecodeError';
    this.kind = kind;
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Cursor over a Uint8Array; every read checks bounds and throws DecodeError. */
class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.bytes.length) throw new DecodeError('Truncated', 'input ended early');
  }

  remaining() {
    return this.bytes.length - this.pos;
  }

  u8() {
    this.need(1);
    return this.bytes[this.pos++];
  }

  u16le() {
    this.need(2);
    const v = this.view.getUint16(this.pos, true);
    this.pos += 2;
    return v;
  }

  f32() {
    this.need(4);
    const v = this.view.getFloat32(this.pos, true);
    this.pos += 4;
    return v;
  }

  f64() {
    this.need(8);
    const v = this.view.getFloat64(this.pos, true);
    this.pos += 8;
    return v;
  }

  /**
   * A postcard (LEB128) varint of an unsigned type with `bits` bits, checked like postcard:
   * at most ceil(bits/7) bytes, and the last byte may not overflow the type.
   */
  varint(bits) {
    const maxBytes = Math.ceil(bits / 7);
    const lastMax = (1 << (bits - 7 * (maxBytes - 1))) - 1;
    let value = 0;
    let big = null;
    for (let i = 0; i < maxBytes; i++) {
      const b = this.u8();
      const low = b & 0x7f;
      if (big === null && i < 7) {
        // Up to 49 bits stay exact in a Number.
        value += low * 2 ** (7 * i);
      } else {
        if (big === null) big = BigInt(value);
        big |= BigInt(low) << BigInt(7 * i);
      }
      if ((b & 0x80) === 0) {
        if (i === maxBytes - 1 && b > lastMax) {
          throw new DecodeError('Malformed', `varint overflows u${bits}`);
        }
        if (big === null) return value;
        return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
      }
    }
    throw new DecodeError('Malformed', `varint longer than u${bits} allows`);
  }

  u16() { return this.varint(16); }
  u32() { return this.varint(32); }
  u64() { return this.varint(64); }

  /** A collection length (usize, encoded as u64). */
  len() {
    const n = this.u64();
    if (typeof n !== 'number' || n > this.bytes.length - this.pos) {
      // Every element takes at least one byte: a larger count cannot be honest.
      throw new DecodeError('Truncated', 'length exceeds the remaining input');
    }
    return n;
  }

  string() {
    const n = this.len();
    this.need(n);
    let s;
    try {
      s = utf8.decode(this.bytes.subarray(this.pos, this.pos + n));
    } catch {
      throw new DecodeError('Malformed', 'string is not valid UTF-8');
    }
    this.pos += n;
    return s;
  }

  /** CarList: count, then per car id gap, x, y (u16 LE), heading, speed, age (u8). */
  carList() {
    const count = this.len();
    const cars = [];
    let nextMin = 0;
    for (let i = 0; i < count; i++) {
      const gap = this.u32();
      const id = nextMin + gap;
      if (id > 0xffffffff) throw new DecodeError('CarIdOverflow', 'car id overflows u32');
      nextMin = id + 1;
      const x = this.u16le();
      const y = this.u16le();
      const heading = this.u8();
      const speed = this.u8();
      const age = this.u8();
      cars.push({ id, x, y, heading, speed, age });
    }
    return cars;
  }

  carInfos() {
    const count = this.len();
    const cars = [];
    for (let i = 0; i < count; i++) cars.push({ id: this.u32(), label: this.string() });
    return cars;
  }
}

function toBytes(input) {
  if (input instanceof Uint8Array) return input;
  if (input instanceof ArrayBuffer) return new Uint8Array(input);
  if (ArrayBuffer.isView(input)) return new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  throw new TypeError('expected a Uint8Array or ArrayBuffer');
}

/**
 * Decodes one datagram payload (after the WebTransport header; for WebSocket, after the channel
 * byte) to `{tick, time_us, part, parts, cars: [{id, x, y, heading, speed, age}]}`.
 * Trailing bytes are ignored. Throws DecodeError.
 */
export function decodeDatagram(payload) {
  const r = new Reader(toBytes(payload));
  const version = r.u8();
  if (version !== DATAGRAM_VERSION) {
    throw new DecodeError('UnsupportedVersion', `unsupported datagram version ${version}`);
  }
  const tick = r.u64();
  const time_us = r.u64();
  const part = r.u16();
  const parts = r.u16();
  const cars = r.carList();
  if (parts === 0 || part >= parts) {
    throw new DecodeError('BadPart', `part ${part} of ${parts} is out of range`);
  }
  return { tick, time_us, part, parts, cars };
}

/**
 * Decodes one frame body (without its length prefix). Returns the message as
 * `{type: 'Hello'|'Roster'|..., ...fields}`, or null for a tag this version does not know.
 * Trailing bytes are ignored. Throws DecodeError.
 */
export function decodeMessage(body) {
  const r = new Reader(toBytes(body));
  const tag = r.u32();
  if (tag >= STREAM_MESSAGE_TAGS) return null;
  const type = MESSAGE_TYPES[tag];
  switch (tag) {
    case 0: {
      const version = r.u16();
      const tick_interval_ms = r.u32();
      const server_time_us = r.u64();
      const quant = {
        origin_lat_deg: r.f64(),
        origin_lon_deg: r.f64(),
        unit_m: r.f32(),
        speed_unit_mps: r.f32(),
      };
      const server = r.string();
      // Appended within version 1: absent (null) from servers that predate it.
      const bounds = r.remaining() >= 32
        ? { south: r.f64(), west: r.f64(), north: r.f64(), east: r.f64() }
        : null;
      return { type, version, tick_interval_ms, server_time_us, quant, server, bounds };
    }
    case 1:
    case 3:
      return { type, cars: r.carInfos() };
    case 2: {
      const tick = r.u64();
      const time_us = r.u64();
      return { type, tick, time_us, cars: r.carList() };
    }
    case 4: {
      const n = r.len();
      const ids = [];
      for (let i = 0; i < n; i++) ids.push(r.u32());
      return { type, ids };
    }
    default: {
      const code = r.u32();
      return { type, code, reason: r.string() };
    }
  }
}

/**
 * Checks a decoded Hello: throws DecodeError of kind 'UnsupportedVersion' when the server speaks
 * a protocol version this client does not. The client must then close the session with
 * CloseCode.UnsupportedVersion (5; on the WebSocket, close code 4005) and not apply anything
 * more from that session (PROTOCOL.md sections 4.2 and 11.4).
 */
export function checkHello(hello) {
  if (hello.version !== PROTOCOL_VERSION) {
    throw new DecodeError(
      'UnsupportedVersion',
      `the server speaks protocol version ${hello.version}; this client speaks ${PROTOCOL_VERSION}`,
    );
  }
  return hello;
}

/** WebSocket close code a client sends for protocol close code `code` (4000 + code). */
export function wsCloseCode(code) {
  return 4000 + code;
}

/**
 * Reads a frame length prefix at `buf[start..end]`: null if incomplete, else [len, prefixBytes].
 */
function readFrameLen(buf, start, end) {
  let len = 0;
  for (let i = 0; i < 5 && start + i < end; i++) {
    const b = buf[start + i];
    len += (b & 0x7f) * 2 ** (7 * i);
    if ((b & 0x80) === 0) {
      if (len > 0xffffffff || (i === 4 && b > 0x0f)) {
        throw new DecodeError('BadLength', 'malformed frame length prefix');
      }
      if (len > MAX_FRAME_LEN) {
        throw new DecodeError('FrameTooLarge', `frame of ${len} bytes exceeds the ${MAX_FRAME_LEN}-byte limit`);
      }
      return [len, i + 1];
    }
  }
  if (end - start >= 5) throw new DecodeError('BadLength', 'malformed frame length prefix');
  return null;
}

/**
 * Incremental decoder for the reliable stream: `push(bytes)` as they arrive, then call `next()`
 * until it returns null. Frames with unknown tags are skipped. After a DecodeError the stream
 * cannot be resynchronised: close the session.
 */
export class FrameDecoder {
  constructor() {
    this.buf = new Uint8Array(4096);
    this.start = 0;
    this.end = 0;
  }

  /** Bytes received but not yet consumed by a complete frame. */
  get buffered() {
    return this.end - this.start;
  }

  /** Appends received bytes. */
  push(bytes) {
    const b = toBytes(bytes);
    if (this.end + b.length > this.buf.length) {
      const live = this.end - this.start;
      if (live + b.length <= this.buf.length) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        const grown = new Uint8Array(Math.max(this.buf.length * 2, live + b.length));
        grown.set(this.buf.subarray(this.start, this.end));
        this.buf = grown;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(b, this.end);
    this.end += b.length;
  }

  /** The next complete message, or null when more bytes are needed. Throws DecodeError. */
  next() {
    for (;;) {
      const head = readFrameLen(this.buf, this.start, this.end);
      if (head === null) return null;
      const [len, prefix] = head;
      if (this.end - this.start < prefix + len) return null;
      const bodyStart = this.start + prefix;
      // Copy the body out: the buffer is reused by later pushes.
      const body = this.buf.slice(bodyStart, bodyStart + len);
      this.start = bodyStart + len;
      if (this.start === this.end) this.start = this.end = 0;
      const msg = decodeMessage(body);
      if (msg !== null) return msg;
    }
  }
}

// ---- Quantisation ------------------------------------------------------------------------

/** Metres per degree of latitude used by the projection (fleetcast-proto's quant.rs). */
export const METRES_PER_DEGREE = 111320.0;

/** Metres east/north of the area's south-west corner for a sample's x/y. */
export function positionM(quant, sample) {
  return { east: sample.x * quant.unit_m, north: sample.y * quant.unit_m };
}

/** Latitude and longitude in degrees of a point east/north metres from the origin. */
export function toLatLon(quant, east, north) {
  const lat = quant.origin_lat_deg + north / METRES_PER_DEGREE;
  const lon = quant.origin_lon_deg +
    east / (METRES_PER_DEGREE * Math.cos((quant.origin_lat_deg * Math.PI) / 180));
  return { lat, lon };
}

/** Degrees clockwise from north for a heading step. */
export function headingDeg(step) {
  return (step * 360) / 256;
}

/** Metres per second for a speed step. */
export function speedMps(quant, step) {
  return step * quant.speed_unit_mps;
}

/** Age of a fix in seconds for an age step. */
export function ageS(step) {
  return step / 10;
}

// ---- The client's view (crates/fleetcast-proto/src/view.rs) -----------------------------

class PartSet {
  constructor(parts) {
    this.parts = parts;
    this.seen = new Set();
  }
  get count() {
    return this.seen.size;
  }
}

/** Counts complete, partial and missed ticks with a small reorder window (view.rs TickTracker). */
export class TickTracker {
  constructor() {
    this.finalisedThrough = null;
    this.early = new Map();
    this.pending = new Map();
    this.highest = 0;
    this.counts = { received: 0, complete: 0, partial: 0, missed: 0, duplicate_parts: 0, late_parts: 0 };
  }

  /** Sets the tick of the initial state; ticks after it are counted. */
  startAfter(tick) {
    if (this.finalisedThrough !== null) return;
    this.finalisedThrough = tick;
    this.highest = tick;
    const early = [...this.early.entries()].sort((a, b) => a[0] - b[0]);
    this.early.clear();
    for (const [t, set] of early) {
      if (t > tick) {
        this.counts.received += 1;
        this.highest = Math.max(this.highest, t);
        this.pending.set(t, set);
      } else {
        this.counts.late_parts += set.count;
      }
    }
    this.finaliseWindow();
  }

  /** Records a part's arrival; returns false if it was a duplicate. */
  record(tick, part, parts) {
    if (this.finalisedThrough === null) {
      let set = this.early.get(tick);
      if (!set) this.early.set(tick, (set = new PartSet(parts)));
      return this.mark(set, part, parts);
    }
    if (tick <= this.finalisedThrough) {
      this.counts.late_parts += 1;
      return true;
    }
    let set = this.pending.get(tick);
    if (!set) {
      this.counts.received += 1;
      this.pending.set(tick, (set = new PartSet(parts)));
    }
    const fresh = this.mark(set, part, parts);
    if (tick > this.highest) {
      this.highest = tick;
      this.finaliseWindow();
    }
    return fresh;
  }

  mark(set, part, parts) {
    // A part count that disagrees with the first part seen is treated like a lost part.
    if (parts !== set.parts || part >= set.parts) return true;
    if (set.seen.has(part)) {
      this.counts.duplicate_parts += 1;
      return false;
    }
    set.seen.add(part);
    return true;
  }

  finaliseWindow() {
    this.finaliseThrough(Math.max(0, this.highest - REORDER_WINDOW));
  }

  finaliseThrough(upto) {
    const done = this.finalisedThrough;
    if (done === null || upto <= done) return;
    let seen = 0;
    for (const t of [...this.pending.keys()].sort((a, b) => a - b)) {
      if (t > upto) break;
      const set = this.pending.get(t);
      this.pending.delete(t);
      seen += 1;
      if (set.count === set.parts) this.counts.complete += 1;
      else this.counts.partial += 1;
    }
    this.counts.missed += upto - done - seen;
    this.finalisedThrough = upto;
  }

  /** Whether every part of `tick` has arrived (false for a tick not seen or already settled). */
  complete(tick) {
    const set = this.pending.get(tick) ?? this.early.get(tick);
    return set !== undefined && set.count === set.parts;
  }

  /** Finalises everything seen so far (the session ended). */
  finish() {
    this.finaliseThrough(this.highest);
  }
}

/**
 * The fleet as one client sees it. `cars` maps id -> {id, label, sample, tick, time_us}.
 * Newest tick wins per car. A sample of an id not on the roster yet (its CarsAdded is still on
 * the way: datagrams overtake the stream) is held, the newest per id, for PENDING_TICKS ticks
 * and at most MAX_PENDING ids, and applied when the roster event arrives. Samples of cars that
 * left are dropped, so a removed car is never resurrected by a late datagram.
 */
export class FleetView {
  constructor() {
    this.hello = null;
    this.cars = new Map();
    this.ticks = new TickTracker();
    this.initialCars = null;
    /** Parts ignored because their tick is not a safe integer. */
    this.unsafeTicks = 0;
    /** id -> {sample, tick, time_us}: the newest sample of an id not on the roster yet. */
    this.pending = new Map();
    /** id -> newest tick seen when it was removed; forgotten PENDING_TICKS ticks later. */
    this.removed = new Map();
    /** Newest tick seen in a State or a part (null before any). */
    this.newest = null;
    /** Tick of the newest State: every car of that tick was in it. */
    this.stateTick = null;
    /**
     * What became of samples whose id was not on the roster (view.rs SampleCounts): held,
     * adopted (applied when the roster event came), expired (no roster event within
     * PENDING_TICKS), removed (the car had left), overflow (MAX_PENDING ids already held).
     */
    this.samples = { held: 0, adopted: 0, expired: 0, removed: 0, overflow: 0 };
  }

  /** Tick counters so far. */
  get counts() {
    return this.ticks.counts;
  }

  /** Applies one message from the reliable stream (as returned by FrameDecoder.next()). */
  applyMessage(msg) {
    switch (msg.type) {
      case 'Hello':
        this.hello = msg;
        break;
      case 'Roster': {
        const keep = new Map(msg.cars.map((c) => [c.id, c.label]));
        for (const id of [...this.cars.keys()]) if (!keep.has(id)) this.removeCar(id);
        for (const [id, label] of keep) this.addCar(id, label);
        break;
      }
      case 'CarsAdded':
        for (const c of msg.cars) this.addCar(c.id, c.label);
        break;
      case 'CarsRemoved':
        for (const id of msg.ids) this.removeCar(id);
        break;
      case 'State': {
        if (typeof msg.tick !== 'number') {
          this.unsafeTicks += 1;
          break;
        }
        if (this.initialCars === null) this.initialCars = msg.cars.length;
        this.applyCars(msg.tick, msg.time_us, msg.cars);
        // The state holds every car of its tick: a held sample of that tick or older belongs to
        // a car that had left by then.
        this.stateTick = this.stateTick === null ? msg.tick : Math.max(this.stateTick, msg.tick);
        for (const [id, p] of this.pending) {
          if (p.tick <= msg.tick) {
            this.pending.delete(id);
            this.samples.removed += 1;
          }
        }
        this.ticks.startAfter(msg.tick);
        break;
      }
      default:
        break;
    }
  }

  /** Puts a car on the roster (or relabels it), with its pending sample if one is held. */
  addCar(id, label) {
    this.removed.delete(id);
    const entry = this.cars.get(id);
    if (entry) {
      entry.label = label;
      return;
    }
    const held = this.pending.get(id);
    this.pending.delete(id);
    if (held) this.samples.adopted += 1;
    this.cars.set(id, {
      id,
      label,
      sample: held ? held.sample : null,
      tick: held ? held.tick : 0,
      time_us: held ? held.time_us : 0,
    });
  }

  /** Takes a car off the roster and remembers that it left. */
  removeCar(id) {
    this.cars.delete(id);
    if (this.pending.delete(id)) this.samples.removed += 1;
    this.removed.set(id, this.newest ?? 0);
  }

  /**
   * Applies a decoded datagram part. Returns {applied, stale, unknown, duplicate, changed}
   * where `changed` lists the entries whose sample was replaced.
   */
  applyPart(part) {
    if (typeof part.tick !== 'number') {
      this.unsafeTicks += 1;
      return { applied: 0, stale: 0, pending: 0, unknown: 0, duplicate: false, changed: [] };
    }
    const fresh = this.ticks.record(part.tick, part.part, part.parts);
    const outcome = this.applyCars(part.tick, part.time_us, part.cars);
    outcome.duplicate = !fresh;
    return outcome;
  }

  applyCars(tick, time_us, cars) {
    this.advance(tick);
    const outcome = { applied: 0, stale: 0, pending: 0, unknown: 0, duplicate: false, changed: [] };
    for (const car of cars) {
      const entry = this.cars.get(car.id);
      if (!entry) this.hold(car, tick, time_us, outcome);
      else if (entry.sample !== null && entry.tick >= tick) outcome.stale += 1;
      else {
        entry.sample = car;
        entry.tick = tick;
        entry.time_us = time_us;
        outcome.applied += 1;
        outcome.changed.push(entry);
      }
    }
    return outcome;
  }

  /** A sample of an id that is not on the roster: hold it for its roster event, or drop it. */
  hold(car, tick, time_us, outcome) {
    const newest = this.newest ?? tick;
    if (this.removed.has(car.id) || (this.stateTick !== null && tick <= this.stateTick)) {
      this.samples.removed += 1;
      outcome.unknown += 1;
      return;
    }
    if (tick + PENDING_TICKS < newest) {
      this.samples.expired += 1;
      outcome.unknown += 1;
      return;
    }
    const held = this.pending.get(car.id);
    if (held && held.tick >= tick) {
      outcome.stale += 1;
    } else if (!held && this.pending.size >= MAX_PENDING) {
      this.samples.overflow += 1;
      outcome.unknown += 1;
    } else {
      this.pending.set(car.id, { sample: car, tick, time_us });
      this.samples.held += 1;
      outcome.pending += 1;
    }
  }

  /** Notes the newest tick seen; drops held samples and removals that are now too old. */
  advance(tick) {
    if (this.newest !== null && this.newest >= tick) return;
    this.newest = tick;
    for (const [id, p] of this.pending) {
      if (p.tick + PENDING_TICKS < tick) {
        this.pending.delete(id);
        this.samples.expired += 1;
      }
    }
    for (const [id, at] of this.removed) if (at + PENDING_TICKS < tick) this.removed.delete(id);
  }

  /** Finalises tick accounting at the end of a session. */
  finish() {
    this.ticks.finish();
  }
}
