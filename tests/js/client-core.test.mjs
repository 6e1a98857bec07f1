// The pure parts of fleetcast-client.js in Node: one session's bytes in and cars out
// (fleetcast-session.js) against the golden vectors of crates/fleetcast-proto, the server list,
// /config.json and certificate-hash handling (fleetcast-servers.js), and connect()'s checks of
// its options. Run: node --test tests/js/client-core.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { FleetSession, closeFor, LATENCY_SAMPLES } from '../../web-demo/fleetcast-session.js';
import {
  serverList, mergeServers, checkConfig, parseCertificateHashes, withToken, webTransportUrl, webSocketUrl,
} from '../../web-demo/fleetcast-servers.js';
import { connect, DEFAULTS, STATES } from '../../web-demo/fleetcast-client.js';
import { CloseCode } from '../../web-demo/fleetcast-wire.js';

const vectors = JSON.parse(readFileSync(fileURLToPath(
  new URL('../../crates/fleetcast-proto/tests/vectors/wire.json', import.meta.url)), 'utf8'));
const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (b) => parseInt(b, 16));
const frame = (name) => hex(vectors.stream.find((v) => v.name === name).hex);
const datagram = (name) => hex(vectors.datagrams.find((v) => v.name === name).hex);
const near = (a, b, eps, what) => assert.ok(Math.abs(a - b) <= eps, `${what}: ${a} is not ${b} ± ${eps}`);

/** A session that has read Hello, Roster and State, fed in 3-byte pieces, at local time 1000 ms. */
function sessionAtState() {
  const s = new FleetSession();
  const bytes = Uint8Array.from([...frame('hello'), ...frame('roster'), ...frame('state')]);
  const seen = { hello: false, fleet: false, goodbye: false };
  for (let i = 0; i < bytes.length; i += 3) {
    const r = s.pushStream(bytes.subarray(i, i + 3), 1000);
    for (const k of Object.keys(seen)) seen[k] ||= r[k];
  }
  assert.deepEqual(seen, { hello: true, fleet: true, goodbye: false });
  return s;
}

test('session: the initial state gives every roster car with a position, in degrees', () => {
  const s = new FleetSession();
  assert.equal(s.ready, false);
  assert.deepEqual(s.cars(0, 0), [], 'nothing before the Hello');
  const t = sessionAtState();
  assert.equal(t.ready, true);
  // The State lists ids 0, 1 and 300; the Roster only 0 and 300: id 1 had left.
  const cars = t.cars(1000, 5_000_000);
  assert.deepEqual(cars.map((c) => [c.id, c.label, c.tick]), [[0, 'FC-0001', 41], [300, 'Tåxi 7', 41]]);
  const [c0, c300] = cars;
  // Hand-computed from the vector's x/y and quantisation (PROTOCOL.md section 6).
  near(c0.lat, 52.353593065053026, 1e-9, 'car 0 lat');
  near(c0.lon, 4.889412058622477, 1e-9, 'car 0 lon');
  assert.equal(c0.headingDeg, 90); // step 64 of 256
  assert.equal(c0.speedMps, 11); // 44 × 0.25
  near(c300.lat, 52.350001257635654, 1e-9, 'car 300 lat');
  assert.equal(c300.ageS, 0.5, 'age 5 steps of 100 ms, just arrived');
  assert.equal(c300.fixTimeMs, 5_000_000 - 500);
  assert.equal(t.view.samples.removed, 1, 'the sample of id 1 was dropped');
});

test('session: ages count on from the fix, without comparing clocks with the server', () => {
  const s = sessionAtState();
  // Tick 42 (one second of server time after the State's tick 41) arrives at 2000 ms.
  const r = s.pushDatagram(datagram('one_part'), 2000, 7_000_000);
  assert.deepEqual(r, { tick: 42, fresh: true, complete: true });
  const at = (now) => Object.fromEntries(s.cars(now, 7_000_000).map((c) => [c.id, c]));
  // Car 0 is in tick 42 with age 0; car 300 is not: its tick-41 fix was 0.5 s old then, a
  // second of server time before tick 42, and 0.25 s have passed here since tick 42 arrived.
  const cars = at(2250);
  near(cars[0].ageS, 0.25, 1e-9, 'car 0');
  near(cars[300].ageS, 0.5 + 1 + 0.25, 1e-9, 'car 300');
  near(cars[300].fixTimeMs, 7_000_000 - 1750, 1e-6, 'car 300 fix time');
  assert.equal(cars[0].tick, 42);
  assert.equal(cars[300].tick, 41);
  assert.equal(Object.keys(cars).length, 2, 'ids 1 and 5 of tick 42 are not on the roster: held, not shown');
});

test('session: a tick in three parts completes with its last part; roster events apply', () => {
  const s = sessionAtState();
  s.pushStream(frame('cars_added'), 1500); // car 100 joins (no position yet)
  const parts = ['multi_part_0', 'multi_part_1', 'multi_part_2'].map((n) => s.pushDatagram(datagram(n), 2000, 0));
  assert.deepEqual(parts.map((p) => [p.fresh, p.complete]), [[true, false], [false, false], [false, true]]);
  assert.deepEqual(s.cars(2000, 0).map((c) => c.id), [0, 300], 'car 100 has no position yet');
  const c300 = s.cars(2000, 0).find((c) => c.id === 300);
  assert.equal(c300.tick, 43);
  near(c300.lat, 52.35128278836335, 1e-9, 'car 300 moved with part 2');
  assert.equal(c300.headingDeg, 255 * 360 / 256);
  s.pushStream(frame('cars_removed'), 2100); // ids 0 and 70000 (unknown: ignored)
  assert.deepEqual(s.cars(2100, 0).map((c) => c.id), [300]);
  // An older tick's part changes nothing (newest wins); a removed car does not come back.
  s.pushDatagram(datagram('one_part'), 2200, 0);
  assert.deepEqual(s.cars(2200, 0).map((c) => [c.id, c.tick]), [[300, 43]]);
});

test('session: wall-clock tick numbers far from zero are counted like any others', () => {
  const s = sessionAtState(); // State at tick 41
  s.pushDatagram(datagram('one_part'), 2000, 0); // 42
  const r = s.pushDatagram(datagram('second_of_three'), 3000, 0); // 100000, part 1 of 3
  assert.deepEqual(r, { tick: 100000, fresh: true, complete: false });
  s.view.finish();
  const c = s.view.counts;
  assert.deepEqual([c.received, c.complete, c.partial, c.missed], [2, 1, 1, 100000 - 41 - 2]);
  assert.equal(s.newest.tick, 100000);
});

test('session: bad datagrams are counted and dropped; bad stream bytes end the session with code 2', () => {
  const s = sessionAtState();
  for (const v of vectors.invalid_datagrams) assert.equal(s.pushDatagram(hex(v.hex), 2000, 0), null, v.name);
  assert.equal(s.badDatagrams, vectors.invalid_datagrams.length);
  assert.equal(s.cars(2000, 0).length, 2, 'the session goes on');
  let error = null;
  try {
    s.pushStream(Uint8Array.of(0x02, 0x00, 0x01), 2000); // a Hello body cut short
  } catch (e) {
    error = e;
  }
  assert.equal(error?.name, 'DecodeError');
  assert.deepEqual(closeFor(error), { code: CloseCode.ProtocolViolation, reason: 'protocol violation' });
});

test('session: a Hello of another version is refused before anything is applied (close code 5)', () => {
  const hello = frame('hello');
  // Body: tag 0, then version 1 as a one-byte varint; make it 2.
  assert.deepEqual([hello[1], hello[2]], [0, 1]);
  const v2 = Uint8Array.from(hello);
  v2[2] = 2;
  const s = new FleetSession();
  let error = null;
  try {
    s.pushStream(Uint8Array.from([...v2, ...frame('roster'), ...frame('state')]), 0);
  } catch (e) {
    error = e;
  }
  assert.equal(error?.kind, 'UnsupportedVersion');
  assert.match(error.message, /version 2/);
  assert.deepEqual(closeFor(error), { code: CloseCode.UnsupportedVersion, reason: 'unsupported protocol version' });
  assert.equal(s.hello, null);
  assert.equal(s.view.cars.size, 0, 'nothing after the Hello was applied');
});

test('session: the Goodbye is kept; latency is the median over the last ticks', () => {
  const s = sessionAtState();
  const seen = s.pushStream(frame('goodbye'), 2000);
  assert.equal(seen.goodbye, true);
  assert.deepEqual(s.goodbye, { code: 1, reason: 'server shutting down' });
  assert.equal(s.latencyP50(), null);
  // Tick 42's server time is 1764072042000 ms: it arrived 12 ms later by this clock.
  s.pushDatagram(datagram('one_part'), 3000, 1764072042012);
  assert.equal(s.latencyP50(), 12);
  assert.ok(LATENCY_SAMPLES >= 10);
});

test('servers: one URL or several, relative or absolute, checked and normalised', () => {
  assert.deepEqual(serverList('https://fleet.example/'), ['https://fleet.example']);
  assert.deepEqual(serverList(['http://a:8080', 'http://b:8080/', 'http://a:8080']), ['http://a:8080', 'http://b:8080']);
  assert.deepEqual(serverList('/', 'http://localhost:8080/map.html?x=1'), ['http://localhost:8080']);
  assert.deepEqual(serverList('https://example.com/fleet/'), ['https://example.com/fleet']);
  assert.deepEqual(serverList('http://[::1]:8080'), ['http://[::1]:8080']);
  for (const bad of ['ftp://x', 'not a url', '', 42, 'http://user:pw@host']) {
    assert.throws(() => serverList(bad), (e) => e instanceof TypeError && /is not an http\(s\) URL/.test(e.message), String(bad));
  }
  assert.throws(() => serverList([]), /empty list/);
});

test('servers: the nodes /config.json names are added after the given ones; junk is ignored', () => {
  const list = ['http://a:8080'];
  assert.deepEqual(mergeServers(list, ['http://a:8080/', 'http://b:8080', 7, 'javascript:alert(1)', 'http://c:8080']),
    ['http://a:8080', 'http://b:8080', 'http://c:8080']);
  assert.equal(mergeServers(list, undefined), list);
  assert.deepEqual(list, ['http://a:8080'], 'the input list is not changed');
});

test('servers: /config.json is checked field by field', () => {
  const good = {
    protocol_version: 1, webtransport_port: 4433, session_path: '/positions', websocket_path: '/positions.ws',
    tick_interval_ms: 1000, token_required: false,
  };
  assert.deepEqual(checkConfig(good), {
    protocolVersion: 1, webtransportPort: 4433, sessionPath: '/positions', websocketPath: '/positions.ws',
    tickIntervalMs: 1000, tokenRequired: false, servers: [],
  });
  assert.deepEqual(checkConfig({ ...good, servers: ['http://b:8080'] }).servers, ['http://b:8080']);
  const cases = [
    [{ ...good, webtransport_port: 0 }, /webtransport_port/],
    [{ ...good, webtransport_port: '4433' }, /webtransport_port/],
    [{ ...good, session_path: 'positions' }, /session_path/],
    [{ ...good, websocket_path: null }, /websocket_path/],
    [{ ...good, tick_interval_ms: 0 }, /tick_interval_ms/],
    [{ ...good, protocol_version: undefined }, /protocol_version/],
    [[], /not an object/],
    [null, /not an object/],
  ];
  for (const [json, message] of cases) assert.throws(() => checkConfig(json), message);
});

test('servers: certificate hashes, one a line (two while renewing), colons allowed', () => {
  const a = 'ab'.repeat(32);
  const b = 'CD:'.repeat(31) + 'CD';
  const hashes = parseCertificateHashes(`${a}\n${b}\n`);
  assert.equal(hashes.length, 2);
  assert.deepEqual(hashes[0], { algorithm: 'sha-256', value: new Uint8Array(32).fill(0xab) });
  assert.deepEqual(hashes[1].value, new Uint8Array(32).fill(0xcd));
  for (const bad of ['', '\n', 'abc', `${a}0`, `${a}\nnot-a-hash`]) {
    assert.throws(() => parseCertificateHashes(bad), /not a list of SHA-256 hashes/, JSON.stringify(bad));
  }
});

test('servers: session URLs carry the token, URL-encoded, on both transports', () => {
  const config = checkConfig({
    protocol_version: 1, webtransport_port: 24433, session_path: '/positions', websocket_path: '/positions.ws', tick_interval_ms: 1000,
  });
  assert.equal(webTransportUrl('http://[::1]:8080', config), 'https://[::1]:24433/positions');
  assert.equal(webSocketUrl('http://localhost:8080', config), 'ws://localhost:8080/positions.ws');
  assert.equal(webSocketUrl('https://fleet.example/live', config), 'wss://fleet.example/live/positions.ws');
  assert.equal(withToken('ws://h/positions.ws', null), 'ws://h/positions.ws');
  assert.equal(withToken('ws://h/positions.ws', 'a b+c'), 'ws://h/positions.ws?token=a%20b%2Bc');
  assert.equal(withToken('https://h/p?x=1', 't'), 'https://h/p?x=1&token=t');
});

test('connect: bad options are refused with an error that names them', () => {
  const cases = [
    [{ server: 'http://a', trasport: 'websocket' }, /unknown option "trasport"/],
    [{ server: 'http://a', transport: 'quic' }, /transport must be one of auto, webtransport, websocket/],
    [{ server: 'http://a', token: 42 }, /token must be a string, null or a function/],
    [{ server: 'http://a', openTimeoutMs: 0 }, /openTimeoutMs must be a positive number/],
    [{ server: 'http://a', staleAfterMs: 'soon' }, /staleAfterMs must be a positive number/],
    [{ server: 'http://a', pauseWhenHidden: true }, /pauseWhenHidden must be a number of milliseconds or false/],
    [{ server: 'ws://a' }, /server "ws:\/\/a" is not an http\(s\) URL/],
    [{}, /give `server`/], // Node has no page address to default to
  ];
  for (const [options, message] of cases) {
    assert.throws(() => connect(options), (e) => e instanceof TypeError && message.test(e.message), JSON.stringify(options));
  }
  assert.throws(() => connect(null), /takes an options object/);
  assert.deepEqual(Object.keys(DEFAULTS).sort(),
    ['deadAfterMs', 'openTimeoutMs', 'pauseWhenHidden', 'server', 'staleAfterMs', 'token', 'transport']);
  assert.deepEqual(STATES, ['connecting', 'live', 'stale', 'reconnecting', 'paused', 'offline']);
});
