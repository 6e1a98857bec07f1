// The browser's decoder (web-demo/fleetcast-wire.js) against the golden vectors that the Rust
// encoder is pinned to (crates/fleetcast-proto/tests/vectors/wire.json), so JavaScript and Rust cannot drift apart.
// Run: node --test tests/js/wire.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import {
  decodeDatagram,
  decodeMessage,
  DecodeError,
  checkHello,
  wsCloseCode,
  CloseCode,
  FrameDecoder,
  FleetView,
  MAX_FRAME_LEN,
  MAX_PENDING,
  PENDING_TICKS,
} from '../../web-demo/fleetcast-wire.js';

const vectors = JSON.parse(
  readFileSync(fileURLToPath(new URL('../../crates/fleetcast-proto/tests/vectors/wire.json', import.meta.url)), 'utf8'),
);

const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (b) => parseInt(b, 16));

/** The vectors write f32 fields as their shortest f32 text: compare as f32. */
function expectedMessage(m) {
  if (m.type !== 'Hello') return m;
  return {
    ...m,
    quant: {
      ...m.quant,
      unit_m: Math.fround(m.quant.unit_m),
      speed_unit_mps: Math.fround(m.quant.speed_unit_mps),
    },
  };
}

test('vectors file has every case', () => {
  assert.equal(vectors.stream.length, 7);
  assert.ok(vectors.datagrams.length >= 3);
  assert.ok(vectors.invalid_datagrams.length >= 7);
});

for (const v of vectors.datagrams) {
  test(`datagram ${v.name} decodes to its JSON`, () => {
    assert.deepEqual(decodeDatagram(hex(v.hex)), v.part);
  });
}

for (const v of vectors.invalid_datagrams) {
  test(`invalid datagram "${v.name}" is rejected`, () => {
    assert.throws(() => decodeDatagram(hex(v.hex)), DecodeError);
  });
}

for (const v of vectors.stream) {
  test(`stream frame ${v.name} decodes to its JSON`, () => {
    const dec = new FrameDecoder();
    dec.push(hex(v.hex));
    assert.deepEqual(dec.next(), expectedMessage(v.message));
    assert.equal(dec.next(), null);
    assert.equal(dec.buffered, 0);
  });
}

test('every stream frame, concatenated and fed one byte at a time, decodes in order', () => {
  const all = vectors.stream.flatMap((v) => [...hex(v.hex)]);
  const dec = new FrameDecoder();
  const got = [];
  for (const b of all) {
    dec.push(Uint8Array.of(b));
    for (let m; (m = dec.next()) !== null; ) got.push(m);
  }
  assert.deepEqual(got, vectors.stream.map((v) => expectedMessage(v.message)));
});

test('frames with unknown tags are skipped, trailing bytes ignored', () => {
  const goodbye = hex(vectors.stream.find((v) => v.name === 'goodbye').hex);
  const dec = new FrameDecoder();
  dec.push(Uint8Array.of(3, 77, 1, 2)); // tag 77, two bytes of body
  // Goodbye with two trailing bytes appended to its body (length prefix + 2).
  dec.push(Uint8Array.of(goodbye[0] + 2, ...goodbye.subarray(1), 0xaa, 0xbb));
  assert.equal(dec.next().type, 'Goodbye');
  assert.equal(dec.next(), null);
});

test('hello: bounds are read when present; a version other than 1 is refused', () => {
  const hello = vectors.stream.find((v) => v.name === 'hello');
  const body = hex(hello.hex).subarray(1); // one-byte length prefix
  const m = decodeMessage(body);
  assert.deepEqual(m.bounds, { south: 52.35, west: 4.86, north: 52.385932, east: 4.918825 });
  assert.equal(decodeMessage(body.subarray(0, body.length - 32)).bounds, null);
  assert.equal(decodeMessage(body.subarray(0, body.length - 9)).bounds, null, 'cut short');
  assert.deepEqual(decodeMessage(Uint8Array.of(...body, 1, 2, 3)).bounds, m.bounds);
  assert.equal(checkHello(m), m);
  const v2 = { ...m, version: 2 };
  assert.throws(() => checkHello(v2), (e) => e instanceof DecodeError && e.kind === 'UnsupportedVersion');
  assert.equal(wsCloseCode(CloseCode.UnsupportedVersion), 4005);
});

test('non-canonical varints are accepted within the type limit; an empty frame body is not', () => {
  const d = decodeDatagram(Uint8Array.of(1, 0x80, 0, 0x80, 0, 0x80, 0, 0x81, 0, 0x80, 0));
  assert.deepEqual([d.tick, d.time_us, d.part, d.parts, d.cars.length], [0, 0, 0, 1, 0]);
  assert.equal(decodeDatagram(Uint8Array.of(1, 0, 0, 0, 0x81, 0x80, 0, 0)).parts, 1);
  assert.throws(() => decodeDatagram(Uint8Array.of(1, 0, 0, 0, 0x81, 0x80, 0x80, 0, 0)), DecodeError);
  const dec = new FrameDecoder();
  dec.push(Uint8Array.of(0x82, 0x00, 0x04, 0x00));
  assert.deepEqual(dec.next(), { type: 'CarsRemoved', ids: [] });
  const empty = new FrameDecoder();
  empty.push(Uint8Array.of(0x00));
  assert.throws(() => empty.next(), (e) => e instanceof DecodeError && e.kind === 'Truncated');
});

test('oversized and malformed frame lengths are rejected', () => {
  const big = new FrameDecoder();
  let n = MAX_FRAME_LEN + 1;
  const prefix = [];
  while (n >= 0x80) {
    prefix.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  prefix.push(n);
  big.push(Uint8Array.from(prefix));
  assert.throws(() => big.next(), (e) => e instanceof DecodeError && e.kind === 'FrameTooLarge');
  const bad = new FrameDecoder();
  bad.push(new Uint8Array(6).fill(0xff));
  assert.throws(() => bad.next(), (e) => e instanceof DecodeError && e.kind === 'BadLength');
});

test('u64 varints beyond 2^53 decode exactly as BigInt, never a rounded Number', () => {
  // Datagram: version, tick = 2^64 - 1, time 0, part 0, parts 1, no cars.
  const tick = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
  const d = decodeDatagram(Uint8Array.of(1, ...tick, 0, 0, 1, 0));
  assert.equal(d.tick, 2n ** 64n - 1n);
  // 2^53 + 1 cannot be a Number.
  const v = 2n ** 53n + 1n;
  const bytes = [];
  for (let x = v; ; ) {
    const low = Number(x & 0x7fn);
    x >>= 7n;
    if (x === 0n) {
      bytes.push(low);
      break;
    }
    bytes.push(low | 0x80);
  }
  assert.equal(decodeDatagram(Uint8Array.of(1, ...bytes, 0, 0, 1, 0)).tick, v);
  // The largest safe integer stays a Number.
  const safe = decodeDatagram(Uint8Array.of(1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 1, 0));
  assert.equal(safe.tick, Number.MAX_SAFE_INTEGER);
  // A u64 varint overflowing 64 bits is rejected.
  const over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
  assert.throws(() => decodeDatagram(Uint8Array.of(1, ...over, 0, 0, 1, 0)), DecodeError);
  // FleetView ignores such a tick instead of doing inexact arithmetic.
  const view = new FleetView();
  view.applyPart(d);
  assert.equal(view.unsafeTicks, 1);
});

test('u16 and u32 varints that overflow their type are rejected', () => {
  // parts = 0x30000 does not fit u16.
  assert.throws(() => decodeDatagram(Uint8Array.of(1, 1, 0, 0, 0x80, 0x80, 0x04, 0)), DecodeError);
  // Goodbye code = 2^32 does not fit u32.
  assert.throws(() => decodeMessage(Uint8Array.of(5, 0x80, 0x80, 0x80, 0x80, 0x10, 0)), DecodeError);
  // Invalid UTF-8 in a label.
  assert.throws(() => decodeMessage(Uint8Array.of(1, 1, 0, 1, 0xff)), DecodeError);
});

// FleetView mirrors crates/fleetcast-proto/src/view.rs: the same cases as its unit tests.
const car = (id, x) => ({ id, x, y: 0, heading: 0, speed: 0, age: 0 });
const part = (tick, p, n, cars) => ({ tick, time_us: tick * 1e6, part: p, parts: n, cars });
function viewWith(ids, stateTick) {
  const v = new FleetView();
  v.applyMessage({ type: 'Roster', cars: ids.map((id) => ({ id, label: `car ${id}` })) });
  v.applyMessage({ type: 'State', tick: stateTick, time_us: 0, cars: ids.map((id) => car(id, 0)) });
  return v;
}

test('view: a newer part replaces an older one, never the reverse', () => {
  const v = viewWith([1, 2], 10);
  assert.equal(v.applyPart(part(12, 0, 1, [car(1, 12)])).applied, 1);
  const o = v.applyPart(part(11, 0, 1, [car(1, 11), car(2, 11)]));
  assert.deepEqual([o.applied, o.stale], [1, 1]);
  assert.equal(v.cars.get(1).sample.x, 12);
  assert.equal(v.cars.get(2).sample.x, 11);
  assert.ok(v.applyPart(part(12, 0, 1, [car(1, 99)])).duplicate);
  assert.equal(v.cars.get(1).sample.x, 12);
});

const info = (id) => ({ id, label: `car ${id}` });
const added = (...ids) => ({ type: 'CarsAdded', cars: ids.map(info) });
const sampleCounts = (v) => {
  const s = v.samples;
  return [s.held, s.adopted, s.removed, s.expired, s.overflow];
};

test('view: removed cars are dropped, unknown ones held until added', () => {
  const v = viewWith([1, 2], 10);
  v.applyMessage({ type: 'CarsRemoved', ids: [2] });
  const o = v.applyPart(part(11, 0, 1, [car(1, 1), car(2, 1), car(3, 1)]));
  assert.deepEqual([o.applied, o.pending, o.unknown], [1, 1, 1]);
  assert.ok(!v.cars.has(2));
  assert.ok(!v.cars.has(3), 'held, not on the roster yet');
  assert.equal(v.pending.size, 1);
  v.applyMessage(added(3));
  assert.deepEqual([v.cars.get(3).sample.x, v.cars.get(3).tick], [1, 11]);
  assert.equal(v.pending.size, 0);
  assert.equal(v.applyPart(part(12, 0, 1, [car(3, 5)])).applied, 1);
  assert.deepEqual(sampleCounts(v), [1, 1, 1, 0, 0]);
});

test('view: pending keeps only the newest sample of an id', () => {
  const v = viewWith([1], 10);
  assert.equal(v.applyPart(part(12, 0, 1, [car(7, 12)])).pending, 1);
  assert.equal(v.applyPart(part(11, 0, 1, [car(7, 11)])).stale, 1);
  assert.equal(v.applyPart(part(13, 0, 1, [car(7, 13)])).pending, 1);
  v.applyMessage(added(7));
  assert.deepEqual([v.cars.get(7).sample.x, v.cars.get(7).tick], [13, 13]);
  assert.deepEqual(sampleCounts(v), [2, 1, 0, 0, 0]);
});

test('view: a pending sample expires after PENDING_TICKS', () => {
  const v = viewWith([1], 10);
  v.applyPart(part(11, 0, 1, [car(7, 11)]));
  v.applyPart(part(11 + PENDING_TICKS, 0, 1, [car(1, 0)]));
  assert.equal(v.pending.size, 1);
  v.applyPart(part(12 + PENDING_TICKS, 0, 1, [car(1, 0)]));
  assert.equal(v.pending.size, 0);
  assert.equal(v.samples.expired, 1);
  v.applyMessage(added(7));
  assert.equal(v.cars.get(7).sample, null);
  const o = v.applyPart(part(11, 0, 1, [car(8, 11)]));
  assert.deepEqual([o.pending, o.unknown], [0, 1]);
  assert.equal(v.samples.expired, 2);
});

test('view: the pending set is capped at MAX_PENDING ids', () => {
  const v = viewWith([], 10);
  const cars = Array.from({ length: MAX_PENDING + 5 }, (_, id) => car(id, 1));
  const o = v.applyPart(part(11, 0, 1, cars));
  assert.deepEqual([o.pending, o.unknown], [MAX_PENDING, 5]);
  assert.equal(v.samples.overflow, 5);
  assert.equal(v.applyPart(part(12, 0, 1, [car(0, 2)])).pending, 1);
});

test('view: parts before the roster are held and sorted out by roster and state', () => {
  const v = new FleetView();
  v.applyPart(part(5, 0, 1, [car(1, 5), car(2, 5)]));
  v.applyPart(part(7, 0, 1, [car(1, 7), car(3, 7)]));
  assert.equal(v.pending.size, 3);
  v.applyMessage({ type: 'Roster', cars: [info(1)] });
  assert.equal(v.cars.get(1).sample.x, 7);
  v.applyMessage({ type: 'State', tick: 6, time_us: 0, cars: [car(1, 6)] });
  assert.equal(v.cars.get(1).sample.x, 7);
  assert.equal(v.pending.size, 1);
  assert.deepEqual(sampleCounts(v), [4, 1, 1, 0, 0]);
  assert.equal(v.applyPart(part(6, 0, 1, [car(2, 6)])).unknown, 1);
  v.applyMessage(added(3));
  assert.equal(v.cars.get(3).tick, 7);
});

test('view: a relabel keeps the sample; a new roster removes the cars it lacks', () => {
  const v = viewWith([1, 2], 10);
  v.applyMessage({ type: 'CarsAdded', cars: [{ id: 1, label: 'renamed' }] });
  assert.deepEqual([v.cars.get(1).label, v.cars.get(1).tick], ['renamed', 10]);
  assert.notEqual(v.cars.get(1).sample, null);
  v.applyMessage({ type: 'Roster', cars: [info(1), info(3)] });
  assert.ok(!v.cars.has(2));
  const o = v.applyPart(part(11, 0, 1, [car(2, 1), car(3, 1)]));
  assert.deepEqual([o.applied, o.unknown], [1, 1]);
  assert.equal(v.samples.removed, 1);
});

test('view: ticks count complete, partial, missed', () => {
  const v = viewWith([1], 10);
  v.applyPart(part(11, 0, 2, []));
  v.applyPart(part(11, 1, 2, []));
  v.applyPart(part(12, 0, 2, [])); // partial; 13 missed
  v.applyPart(part(14, 1, 2, []));
  v.applyPart(part(14, 0, 2, []));
  v.finish();
  const c = v.counts;
  assert.deepEqual([c.received, c.complete, c.partial, c.missed], [3, 2, 1, 1]);
});

test('view: reordered ticks within the window still complete; later ones are late', () => {
  const v = viewWith([1], 0);
  v.applyPart(part(2, 0, 1, []));
  v.applyPart(part(1, 0, 1, []));
  v.applyPart(part(3, 0, 1, []));
  v.finish();
  assert.deepEqual([v.counts.complete, v.counts.missed, v.counts.late_parts], [3, 0, 0]);
  const w = viewWith([1], 0);
  w.applyPart(part(10, 0, 1, []));
  w.applyPart(part(1, 0, 1, []));
  w.finish();
  const c = w.counts;
  assert.deepEqual([c.received, c.complete, c.missed, c.late_parts], [1, 1, 9, 1]);
});

test('view: ticks are counted as in the protocol example (section 7, rule 5)', () => {
  const v = viewWith([1], 10);
  for (const t of [11, 13, 12, 16, 14]) v.applyPart(part(t, 0, 1, []));
  v.finish();
  const c = v.counts;
  assert.deepEqual([c.received, c.complete, c.missed, c.late_parts], [5, 5, 1, 0]);
  const w = viewWith([1], 10);
  for (const t of [11, 13, 15, 12]) w.applyPart(part(t, 0, 1, []));
  assert.equal(w.counts.late_parts, 1);
});

test('view: parts before the state are sorted out when it arrives', () => {
  const v = new FleetView();
  v.applyMessage({ type: 'Roster', cars: [{ id: 1, label: 'a' }] });
  v.applyPart(part(5, 0, 1, [car(1, 5)]));
  v.applyPart(part(6, 0, 1, [car(1, 6)]));
  v.applyMessage({ type: 'State', tick: 5, time_us: 0, cars: [car(1, 50)] });
  assert.equal(v.cars.get(1).sample.x, 6);
  v.finish();
  const c = v.counts;
  assert.deepEqual([c.received, c.complete, c.late_parts], [1, 1, 1]);
  assert.equal(v.initialCars, 1);
});

test('view: inconsistent part counts do not throw', () => {
  const v = viewWith([1], 0);
  v.applyPart(part(1, 0, 2, []));
  v.applyPart(part(1, 4, 9, []));
  v.applyPart(part(1, 1, 2, []));
  v.finish();
  assert.equal(v.counts.complete, 1);
});
