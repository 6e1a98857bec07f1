// Real-browser tests of the web demo: a real `fleetcast serve`, Debian's Chromium driven by
// playwright-core, real WebTransport over QUIC on loopback and the real WebSocket fallback.
// Run: scripts/test-browser.sh (builds the binary first), or
//      FLEETCAST_BIN=target/debug/fleetcast node --test tests/js/browser.test.mjs
// Screenshots land in test-artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.FLEETCAST_BIN ??
  join(process.env.CARGO_TARGET_DIR ?? join(ROOT, 'target'), 'debug', 'fleetcast');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = join(ROOT, 'test-artifacts');
const CARS = 150;
const WAIT_MS = 30_000;

mkdirSync(ARTIFACTS, { recursive: true });
const tempDirs = [];
const servers = new Set();
let browser;

/** Starts `fleetcast serve` (with `extra` arguments); resolves once its log names both ports. */
function startServer({ httpPort = 0, wtPort = 0, extra = [] } = {}) {
  const certDir = mkdtempSync(join(tmpdir(), 'fleetcast-certs-'));
  tempDirs.push(certDir);
  const child = spawn(BIN, [
    'serve',
    '--wt-listen', `[::]:${wtPort}`,
    '--http-listen', `[::1]:${httpPort}`,
    '--cars', String(CARS),
    '--cert-dir', certDir,
    '--web-root', join(ROOT, 'web-demo'),
    '--shutdown-timeout', '2s',
    ...extra,
  ], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NO_COLOR: '1', RUST_LOG: 'info' } });
  servers.add(child);
  let log = '';
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    servers.delete(child);
    resolve({ code, signal });
  }));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), WAIT_MS);
    child.stderr.on('data', (chunk) => {
      log += chunk.toString().replace(/\x1b\[[0-9;]*m/g, '');
      const http = log.match(/web demo:\s+https?:\/\/localhost:(\d+)\//);
      const wt = log.match(/session URL:\s+https:\/\/localhost:(\d+)\//);
      if (http && wt) {
        clearTimeout(timer);
        resolve({
          child,
          exited,
          httpPort: Number(http[1]),
          wtPort: Number(wt[1]),
          url: `http://localhost:${http[1]}/`,
          log: () => log,
        });
      }
    });
    child.on('exit', () => {
      clearTimeout(timer);
      reject(new Error(`server exited early:\n${log}`));
    });
  });
}

async function stopServer(server) {
  server.child.kill('SIGTERM');
  return server.exited;
}

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: process.getuid?.() === 0 ? ['--no-sandbox'] : [],
  });
});

after(async () => {
  await browser?.close();
  for (const child of servers) child.kill('SIGTERM');
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

/** A fresh page that records console errors (certificate problems show only there). */
async function newPage({ noWebTransport = false, viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  if (noWebTransport) {
    await context.addInitScript(() => {
      delete window.WebTransport;
    });
  }
  const page = await context.newPage();
  const console = [];
  page.on('console', (m) => console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.push(`pageerror: ${e.message}`));
  return { context, page, console };
}

const fleetcast = (page) => page.evaluate(() => {
  const { carList, ...rest } = window.fleetcast;
  return rest;
});

/** Waits for a live session on `transport` with every car and at least `ticks` ticks. */
async function waitLive(page, transport, ticks, logs) {
  try {
    await page.waitForFunction(
      ([t, n, k]) => {
        const f = window.fleetcast;
        return f && f.connected && f.transport === t && f.initialCars === n && f.cars === n &&
          f.ticksReceived >= k;
      },
      [transport, CARS, ticks],
      { timeout: WAIT_MS, polling: 100 },
    );
  } catch (e) {
    const state = await fleetcast(page).catch(() => null);
    throw new Error(`${e.message}\nstate: ${JSON.stringify(state)}\nconsole:\n${logs.join('\n')}`);
  }
}

/** Checks the map really shows the cars: drawn count, coloured pixels, every car updated. */
async function assertCarsDrawn(page) {
  const f = await fleetcast(page);
  assert.equal(f.carsDrawn, CARS, 'every car is inside the viewport and drawn');
  const cars = await page.evaluate(() => window.fleetcast.carList());
  assert.equal(cars.length, CARS);
  assert.ok(cars.every((c) => c.screen !== null), 'every car has a screen position');
  assert.ok(cars.every((c) => c.tick > 0), 'every car was updated by a tick after the state');
  // Cars are drawn in saturated colours; roads and background are grey. Count coloured pixels.
  const coloured = await page.evaluate(() => {
    const c = document.getElementById('map');
    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {
      const max = Math.max(data[i], data[i + 1], data[i + 2]);
      const min = Math.min(data[i], data[i + 1], data[i + 2]);
      if (max - min > 90) n += 1;
    }
    return n;
  });
  assert.ok(coloured >= CARS * 10, `expected car pixels on the canvas, found ${coloured}`);
}

test('WebTransport: connects, shows every car, applies ticks, draws them', async () => {
  const server = await startServer();
  const { context, page, console } = await newPage();
  try {
    await page.goto(server.url);
    await waitLive(page, 'webtransport', 3, console);
    await assertCarsDrawn(page);
    const f = await fleetcast(page);
    assert.equal(f.fallbackReason, null);
    assert.ok(f.latencyP50Ms !== null && f.latencyP50Ms >= 0);
    assert.ok(f.bytesPerSecond > 0);
    assert.match(await page.textContent('#conn'), /live · WebTransport/);
    assert.equal(await page.textContent('#s-cars'), String(CARS));

    // Clicking a car shows its details.
    const car = (await page.evaluate(() => window.fleetcast.carList()))
      .find((c) => c.screen[0] > 350 && c.screen[1] > 250 && c.screen[0] < 1000);
    await page.mouse.click(car.screen[0], car.screen[1]);
    await page.waitForSelector('#details:not([hidden])', { timeout: 5000 });
    const label = await page.textContent('#d-label');
    const shown = (await page.evaluate(() => window.fleetcast.carList()))
      .find((c) => c.label === label);
    assert.ok(shown, `details show a real car: ${label}`);
    assert.match(await page.textContent('#d-speed'), /km\/h$/);
    assert.match(await page.textContent('#d-pos'), /^52\.\d+, 4\.\d+$/);
    await page.screenshot({ path: join(ARTIFACTS, 'webtransport.png') });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

test('a session the server closes shows its close code and reason in the page', async () => {
  // The server ends a session with CLOSE_WEBTRANSPORT_SESSION, so the browser's
  // `WebTransport.closed` resolves with the server's code and reason (PROTOCOL.md section 8).
  // To make it close one, the page breaks protocol v1: it sends a datagram.
  const server = await startServer();
  const { context, page, console } = await newPage();
  await context.addInitScript(() => {
    const Original = window.WebTransport;
    window.__sessions = [];
    window.WebTransport = class extends Original {
      constructor(...args) {
        super(...args);
        window.__sessions.push(this);
      }
    };
  });
  try {
    await page.goto(server.url);
    await waitLive(page, 'webtransport', 2, console);
    await page.evaluate(async () => {
      const writer = window.__sessions.at(-1).datagrams.writable.getWriter();
      await writer.write(new Uint8Array([1, 2, 3]));
    });
    await page.waitForFunction(() => window.fleetcast.lastClose !== null, null, { timeout: WAIT_MS });
    const f = await fleetcast(page);
    if (process.env.FLEETCAST_DEBUG_CLOSE) process.stderr.write(`${JSON.stringify(f.lastClose)}\n${server.log()}\n`);
    assert.equal(f.lastClose.code, 2, `ProtocolViolation: ${JSON.stringify(f.lastClose)}`);
    assert.match(f.lastClose.reason, /clients must not send datagrams/);
    // And the page carries on with a new session.
    await page.waitForFunction(() => window.fleetcast.sessions >= 2 && window.fleetcast.connected, null,
      { timeout: WAIT_MS });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

test('WebSocket forced with ?transport=websocket', async () => {
  const server = await startServer();
  const { context, page, console } = await newPage();
  try {
    await page.goto(`${server.url}?transport=websocket`);
    await waitLive(page, 'websocket', 3, console);
    await assertCarsDrawn(page);
    assert.match(await page.textContent('#conn'), /live · WebSocket/);
    await page.screenshot({ path: join(ARTIFACTS, 'websocket-forced.png') });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

test('WebSocket fallback when the browser has no WebTransport', async () => {
  const server = await startServer();
  const { context, page, console } = await newPage({ noWebTransport: true });
  try {
    await page.goto(server.url);
    await waitLive(page, 'websocket', 3, console);
    await assertCarsDrawn(page);
    const f = await fleetcast(page);
    assert.match(f.fallbackReason, /no WebTransport/);
    assert.match(await page.textContent('#notice'), /WebSocket fallback/);
    await page.screenshot({ path: join(ARTIFACTS, 'websocket-fallback.png') });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

test('phone-sized viewport shows the whole fleet too', async () => {
  const server = await startServer();
  const { context, page, console } = await newPage({ viewport: { width: 390, height: 844 } });
  try {
    await page.goto(server.url);
    await waitLive(page, 'webtransport', 2, console);
    await assertCarsDrawn(page);
    await page.screenshot({ path: join(ARTIFACTS, 'phone.png') });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

for (const transport of ['webtransport', 'websocket']) {
  test(`${transport}: reconnects after the server restarts with a new certificate`, async () => {
    let server = await startServer();
    const { context, page, console } = await newPage();
    try {
      const query = transport === 'websocket' ? '?transport=websocket' : '';
      await page.goto(server.url + query);
      await waitLive(page, transport, 3, console);
      const before = await fleetcast(page);
      assert.equal(before.sessions, 1);

      const { httpPort, wtPort } = server;
      const exit = await stopServer(server);
      assert.equal(exit.code, 0, `server exits cleanly on SIGTERM:\n${server.log()}`);
      await page.waitForFunction(() => !window.fleetcast.connected, null, { timeout: WAIT_MS });
      await page.waitForFunction(
        () => /reconnecting/.test(document.getElementById('conn').textContent),
        null,
        { timeout: WAIT_MS },
      );
      const down = await fleetcast(page);
      assert.equal(down.lastGoodbye?.code, 1, 'the page saw the going-away goodbye');
      await page.screenshot({ path: join(ARTIFACTS, `${transport}-reconnecting.png`) });

      // Same ports, new certificate directory: a new self-signed certificate and hash.
      server = await startServer({ httpPort, wtPort });
      await page.waitForFunction(
        ([t, k]) => window.fleetcast.sessions >= 2 && window.fleetcast.connected &&
          window.fleetcast.transport === t && window.fleetcast.ticksReceived >= k,
        [transport, before.ticksReceived + 3],
        { timeout: WAIT_MS, polling: 100 },
      ).catch(async (e) => {
        throw new Error(`${e.message}\nstate: ${JSON.stringify(await fleetcast(page))}\n` +
          `console:\n${console.join('\n')}`);
      });
      await assertCarsDrawn(page);
      await page.screenshot({ path: join(ARTIFACTS, `${transport}-reconnected.png`) });
    } finally {
      await context.close();
      await stopServer(server);
    }
  });
}

test('ingest: posted cars appear on the page at their positions with their fix age', async () => {
  const token = 'browser-test-publisher-token';
  const server = await startServer({ extra: ['--feed', 'ingest', '--publish-token', token] });
  const { context, page, console } = await newPage();
  try {
    // 100 real cars, their fixes taken 3 s ago, spread over the default area (52.35, 4.86, 4 km).
    const M = 111320;
    const cosLat = Math.cos((52.35 * Math.PI) / 180);
    const fixMs = Date.now() - 3000;
    const sent = new Map();
    const fixes = [];
    for (let i = 0; i < 100; i += 1) {
      const east = 100 + 37.3 * i;
      const north = 3900 - 29.1 * i;
      const fix = {
        id: `van-${i}`, lat: 52.35 + north / M, lon: 4.86 + east / (M * cosLat),
        heading_deg: (i * 7) % 360, speed_mps: i * 0.25, time: new Date(fixMs).toISOString(),
        label: `Van ${i}`,
      };
      sent.set(fix.label, fix);
      fixes.push(fix);
    }
    const res = await fetch(`http://[::1]:${server.httpPort}/v1/positions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify(fixes),
    });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { accepted: 100, rejected: [] });

    await page.goto(server.url);
    // The cars may be in the initial state or join right after it (the post and the page race
    // the next tick): wait for all 100 with a sample, whichever way they came.
    await page.waitForFunction(() => {
      const f = window.fleetcast;
      return f && f.connected && f.transport === 'webtransport' && f.ticksReceived >= 2 &&
        f.cars === 100 && f.carList().every((c) => c.lat !== undefined);
    }, null, { timeout: WAIT_MS, polling: 100 });
    const cars = await page.evaluate(() => window.fleetcast.carList());
    assert.equal(cars.length, 100);
    const unit = 0.07; // metres per step for a 4 km area
    for (const c of cars) {
      const f = sent.get(c.label);
      assert.ok(f, `a posted car: ${c.label}`);
      const dn = (c.lat - f.lat) * M;
      const de = (c.lon - f.lon) * M * cosLat;
      assert.ok(Math.abs(dn) <= unit / 2 + 1e-6 && Math.abs(de) <= unit / 2 + 1e-6,
        `${c.label} is ${de.toFixed(3)} m east, ${dn.toFixed(3)} m north of where it was posted`);
      assert.ok(Math.abs(c.headingDeg - f.heading_deg) <= 360 / 512 + 1e-9, `${c.label} heading`);
      assert.ok(Math.abs(c.speedMps - f.speed_mps) <= 0.125 + 1e-9, `${c.label} speed`);
      // The wire's age is the tick's time minus the fix's own time, in whole 100 ms steps.
      const exact = (c.tickTimeMs - fixMs) / 1000;
      assert.ok(c.ageS <= exact + 1e-9 && exact - c.ageS < 0.1 + 1e-6,
        `${c.label}: age ${c.ageS} s for a fix ${exact} s before its tick`);
      assert.ok(c.ageS >= 3, `${c.label}: the fix was 3 s old when posted`);
    }
    await page.screenshot({ path: join(ARTIFACTS, 'ingest.png') });
  } finally {
    await context.close();
    await stopServer(server);
  }
});

test('subscriber token: ?token= goes live over WebTransport; without one the page shows the refusal', async () => {
  const secret = 'browser-test-secret-0123456789abcdef';
  const server = await startServer({ extra: ['--subscribe-secret', secret] });
  const token = execFileSync(BIN, ['token', '--secret', secret, '--ttl', '10m']).toString().trim();
  const refused = 'refused (token missing, invalid or expired?)';
  try {
    const ok = await newPage();
    try {
      await ok.page.goto(`${server.url}?token=${encodeURIComponent(token)}`);
      await waitLive(ok.page, 'webtransport', 3, ok.console);
      await assertCarsDrawn(ok.page);
      const f = await fleetcast(ok.page);
      assert.equal(f.tokenRequired, true);
      assert.equal(f.fallbackReason, null, 'WebTransport itself accepted the token');
      assert.equal(await ok.page.textContent('#s-token'), 'accepted');
    } finally {
      await ok.context.close();
    }

    const { context, page, console } = await newPage();
    try {
      await page.goto(server.url);
      await page.waitForFunction(
        (text) => window.fleetcast.tokenStatus === text && window.fleetcast.reconnects >= 2,
        refused,
        { timeout: WAIT_MS, polling: 100 },
      ).catch(async (e) => {
        throw new Error(`${e.message}\nstate: ${JSON.stringify(await fleetcast(page))}\n` +
          `console:\n${console.join('\n')}`);
      });
      const f = await fleetcast(page);
      assert.equal(f.connected, false);
      assert.equal(f.sessions, 0, 'no session ever opened');
      assert.equal(f.cars, 0);
      assert.equal(f.ticksReceived, 0, 'no position reached the page');
      assert.ok(await page.isVisible('#s-token-row'));
      assert.equal(await page.textContent('#s-token'), refused);
      assert.match(await page.textContent('#notice'), /requires a subscriber token/);
      // The server refused it on both transports (the page fell back to the WebSocket).
      const health = await (await fetch(`http://[::1]:${server.httpPort}/healthz`)).json();
      assert.ok(health.counters.refused_unauthorized >= 1, JSON.stringify(health.counters));
      assert.ok(health.counters.ws_refused_unauthorized >= 1, JSON.stringify(health.counters));
      assert.equal(health.counters.sessions_accepted, 1, 'only the page with the token');
      await page.screenshot({ path: join(ARTIFACTS, 'token-refused.png') });
    } finally {
      await context.close();
    }
  } finally {
    await stopServer(server);
  }
});

test('certificate renewal: the page trusts both published hashes and stays live through the switch', async () => {
  // 12 s certificates: the next hash is published with 6 s left, the switch comes with 3 s left.
  const server = await startServer({ extra: ['--cert-validity', '12s'] });
  const { context, page, console } = await newPage();
  const hashes = async () =>
    (await (await fetch(`http://[::1]:${server.httpPort}/certificate.sha256`)).text()).trim().split('\n');
  const waitFor = async (cond, what) => {
    const deadline = Date.now() + WAIT_MS;
    while (!(await cond())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${server.log()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  try {
    const first = await hashes();
    assert.equal(first.length, 1);
    await waitFor(async () => (await hashes()).length === 2, 'the next hash to be published');
    const [current, next] = await hashes();
    assert.equal(current, first[0]);

    // A page opened now passes both hashes to WebTransport.
    await page.goto(server.url);
    await waitLive(page, 'webtransport', 1, console);
    assert.equal((await fleetcast(page)).certificateHashes, 2);
    const sessions = (await fleetcast(page)).sessions;

    // The server switches to the next certificate: the open session goes on, no reconnect.
    await waitFor(async () => {
      const h = await hashes();
      return h.length === 1 && h[0] === next;
    }, 'the switch to the next certificate');
    const before = (await fleetcast(page)).ticksReceived;
    await page.waitForFunction((n) => window.fleetcast.ticksReceived > n + 2, before,
      { timeout: WAIT_MS, polling: 100 });
    const after = await fleetcast(page);
    assert.equal(after.sessions, sessions, 'the session opened before the switch is still the one');
    assert.equal(after.transport, 'webtransport');

    // A page loaded after the switch trusts the new certificate and goes live over WebTransport.
    await page.reload();
    await waitLive(page, 'webtransport', 1, console);
  } finally {
    await context.close();
    await stopServer(server);
  }
});
