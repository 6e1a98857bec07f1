// fleetcast-client.js in real browsers (Chromium and Firefox, tests/js/support/browsers.mjs)
// against real `fleetcast serve` processes: a bare page on an origin of its own (like a
// customer's dashboard, served by a small static server) imports the library and records
// what its events say (tests/js/pages/client.html).
// Run: scripts/test-browser.sh, or FLEETCAST_BIN=target/debug/fleetcast node --test tests/js/client.browser.test.mjs

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { WebSocketServer } from 'ws';

import { startServer, stopServer, health, cleanUpServers, ROOT, BIN } from './support/fleetcast-server.mjs';
import { BROWSERS, launch, newPage, waitFor } from './support/browsers.mjs';
import { startStaticServer } from './support/static-server.mjs';

const CARS = 60;
let statics;
/** Flags every server of this file needs: the test page's origin may open sessions. */
const allowPage = () => ['--allow-origin', statics.url];

before(async () => {
  statics = await startStaticServer({ '/lib/': join(ROOT, 'web-demo'), '/': join(ROOT, 'tests/js/pages') });
});
after(async () => {
  await statics?.close();
  cleanUpServers();
});

/** A fresh context with the bare library page loaded. */
async function libraryPage(browser, options = {}) {
  const p = await newPage(browser, options);
  await p.page.goto(`${statics.url}/client.html`);
  await waitFor(p.page, () => window.ready === true, null, { logs: p.logs, what: 'the test page' });
  return p;
}

/** Calls connect(options) in the page; returns the connection's index for report(). */
async function start(page, options, extra = {}) {
  const r = await page.evaluate((o, e) => window.start(o, e), options, extra);
  assert.equal(r.error, undefined, r.error);
  return r.index;
}

const report = (page, i) => page.evaluate((n) => window.report(n), i);

/**
 * Waits until connection `i` satisfies `cond(report, arg)` (a function run in the page) and
 * returns the report.
 */
async function until(p, i, cond, arg = null, what = 'condition') {
  await waitFor(p.page, ({ i: n, cond: src, arg: a }) => {
    // eslint-disable-next-line no-new-func
    const f = new Function(`return (${src})`)();
    return f(window.report(n), a);
  }, { i, cond: cond.toString(), arg }, { logs: p.logs, what, describe: new Function(`return window.report(${i})`) });
  return report(p.page, i);
}

/** Live on `transport` with every car and at least `ticks` ticks (after `sessions` sessions). */
function live(p, i, transport, { ticks = 2, sessions = 1, server = null } = {}) {
  return until(p, i, (r, a) => r.state === 'live' && r.transport === a.transport && r.stats.sessions === a.sessions &&
    r.lastTick?.cars === a.cars && r.stats.initialCars === a.cars && r.stats.ticksReceived >= a.ticks &&
    r.everyCarComplete && (a.server === null || r.server === a.server),
  { transport, ticks, sessions, cars: CARS, server }, `live on ${transport}`);
}

/** Polls `fn` in Node until it returns something truthy. */
async function eventually(fn, what, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

for (const name of BROWSERS) {
  describe(`fleetcast-client.js in ${name}`, () => {
    let browser;
    let server;
    before(async () => {
      server = await startServer({ cars: CARS, extra: allowPage() });
      browser = await launch(name);
    });
    after(async () => {
      await browser?.close();
      if (server) await stopServer(server);
    });

    for (const transport of ['webtransport', 'websocket']) {
      test(`${transport}: a bare page counts ticks and gets every car; close() ends the session`, async () => {
        const p = await libraryPage(browser);
        try {
          const i = await start(p.page, { server: server.base, transport: transport === 'websocket' ? 'websocket' : 'auto' });
          const r = await live(p, i, transport, { ticks: 3 });
          assert.deepEqual(r.states.slice(0, 2), ['connecting', 'live']);
          assert.ok(r.tickEvents >= 3, `tick events: ${r.tickEvents}`);
          assert.equal(r.server, server.base);
          assert.ok(r.area.south < r.area.north && r.area.west < r.area.east, JSON.stringify(r.area));
          const car = r.sampleCar;
          assert.ok(car.lat > r.area.south - 0.01 && car.lat < r.area.north + 0.01, `lat ${car.lat}`);
          assert.ok(car.ageS >= 0 && car.ageS < 5, `age ${car.ageS}`);
          if (transport === 'webtransport') {
            assert.equal(r.stats.fallbackReason, null);
            assert.equal(r.stats.certificateHashes, 1);
          } else {
            assert.match(r.stats.fallbackReason, /'websocket' was asked for/);
          }
          assert.ok((await health(server)).sessions >= 1);
          await p.page.evaluate((n) => window.closeRun(n), i);
          const closed = await report(p.page, i);
          assert.equal(closed.state, 'offline');
          assert.equal(closed.transport, null);
          await eventually(async () => (await health(server)).sessions === 0, 'the server to see the session end');
        } finally {
          await p.context.close();
        }
      });
    }

    test('auto falls back to the WebSocket when the browser has no WebTransport', async () => {
      const p = await libraryPage(browser, { noWebTransport: true });
      try {
        const i = await start(p.page, { server: server.base });
        const r = await live(p, i, 'websocket');
        assert.equal(r.stats.fallbackReason, 'this browser has no WebTransport');
      } finally {
        await p.context.close();
      }
    });

    test('auto falls back to the WebSocket, in the same attempt, when WebTransport cannot open', async () => {
      // The browser is given a certificate hash that does not match: the real handshake fails.
      const p = await libraryPage(browser, {
        initScript: () => {
          const Real = window.WebTransport;
          window.WebTransport = class extends Real {
            constructor(url, options = {}) {
              const wrong = (options.serverCertificateHashes ?? [])
                .map((h) => ({ algorithm: h.algorithm, value: new Uint8Array(h.value).map((b) => b ^ 0xff) }));
              super(url, { ...options, serverCertificateHashes: wrong });
            }
          };
        },
      });
      try {
        const i = await start(p.page, { server: server.base });
        const r = await live(p, i, 'websocket');
        assert.match(r.stats.fallbackReason, /^WebTransport failed: /);
        assert.equal(r.stats.reconnects, 0, 'no second attempt was needed');
      } finally {
        await p.context.close();
      }
    });

    test('both transports reconnect after a server restart with a new certificate', async () => {
      let restarting = await startServer({ cars: CARS, extra: allowPage() });
      const p = await libraryPage(browser);
      try {
        const wt = await start(p.page, { server: restarting.base });
        const ws = await start(p.page, { server: restarting.base, transport: 'websocket' });
        await live(p, wt, 'webtransport');
        const before = await live(p, ws, 'websocket');

        const { httpPort, wtPort } = restarting;
        assert.equal((await stopServer(restarting)).code, 0);
        for (const i of [wt, ws]) {
          const down = await until(p, i, (r) => r.state === 'reconnecting' && r.transport === null, null, 'reconnecting');
          assert.equal(down.stats.lastGoodbye?.code, 1, 'the going-away Goodbye was read');
        }
        // The same ports, a new certificate directory: a new certificate and hash.
        restarting = await startServer({ httpPort, wtPort, cars: CARS, extra: allowPage() });
        const again = await live(p, wt, 'webtransport', { sessions: 2 });
        assert.equal(again.stats.fallbackReason, null, 'the new hash was fetched: WebTransport, not the fallback');
        const ws2 = await live(p, ws, 'websocket', { sessions: 2, ticks: before.stats.ticksReceived + 2 });
        assert.ok(ws2.stats.reconnects >= 1);
      } finally {
        await p.context.close();
        await stopServer(restarting);
      }
    });

    test('a hidden page pauses its session and starts a fresh one when shown again', async () => {
      const own = await startServer({ cars: CARS, extra: allowPage() });
      const p = await libraryPage(browser);
      try {
        const i = await start(p.page, { server: own.base, pauseWhenHidden: 300 });
        await live(p, i, 'webtransport');
        const other = await p.context.newPage(); // a second tab in front hides the first
        await other.bringToFront();
        const paused = await until(p, i, (r) => r.state === 'paused', null, 'paused');
        assert.equal(paused.lastState.reason, 'the page is hidden');
        await eventually(async () => (await health(own)).sessions === 0, 'the session to end on the server');
        // While hidden: the server goes on ticking, the page receives nothing.
        const tick = (await health(own)).tick;
        await eventually(async () => (await health(own)).tick >= tick + 3, 'three more server ticks');
        const still = await report(p.page, i);
        assert.equal(still.state, 'paused');
        assert.equal(still.stats.ticksReceived, paused.stats.ticksReceived, 'no tick while hidden');

        await p.page.bringToFront();
        const back = await live(p, i, 'webtransport', { sessions: 2, ticks: paused.stats.ticksReceived + 1 });
        assert.ok(back.lastTick.tick >= tick + 3, 'the cars come from the fresh session');
        assert.deepEqual(back.states.slice(-3), ['paused', 'reconnecting', 'live']);
      } finally {
        await p.context.close();
        await stopServer(own);
      }
    });

    test('several servers: round robin past a stopped one, onto the one that is up', async () => {
      const a = await startServer({ cars: CARS, extra: allowPage() });
      const b = await startServer({ cars: CARS, extra: allowPage() });
      let revived = null;
      const p = await libraryPage(browser);
      try {
        assert.equal((await stopServer(a)).code, 0);
        const i = await start(p.page, { server: [a.base, b.base], openTimeoutMs: 2000 });
        const first = await live(p, i, 'webtransport', { server: b.base });
        assert.deepEqual(first.servers, [a.base, b.base]);
        // b stops, a comes back: the page must move on to the other URL.
        assert.equal((await stopServer(b)).code, 0);
        revived = await startServer({ httpPort: a.httpPort, wtPort: a.wtPort, cars: CARS, extra: allowPage() });
        await live(p, i, 'webtransport', { server: a.base, sessions: 2 });
      } finally {
        await p.context.close();
        if (revived) await stopServer(revived);
      }
    });

    test("a node's /config.json servers list takes the page to another node when its node stops", async () => {
      const b = await startServer({ cars: CARS, extra: allowPage() });
      const a = await startServer({ cars: CARS, extra: [...allowPage(), '--servers', b.base] });
      const p = await libraryPage(browser);
      try {
        // The page is told of a alone; a's /config.json names b.
        const i = await start(p.page, { server: a.base, openTimeoutMs: 2000 });
        const first = await live(p, i, 'webtransport', { server: a.base });
        assert.deepEqual(first.servers, [a.base, b.base]);
        assert.equal((await stopServer(a)).code, 0);
        await live(p, i, 'webtransport', { server: b.base, sessions: 2 });
      } finally {
        await p.context.close();
        await stopServer(b);
      }
    });

    test('ticks stop: the state turns stale, then live again; long silence opens a new session', async () => {
      const own = await startServer({ cars: CARS, extra: allowPage() });
      const p = await libraryPage(browser);
      try {
        const i = await start(p.page, { server: own.base, staleAfterMs: 1200, deadAfterMs: 3000, openTimeoutMs: 1500 });
        await live(p, i, 'webtransport');
        own.child.kill('SIGSTOP'); // the server stops ticking; the session stays open
        const stale = await until(p, i, (r) => r.state === 'stale', null, 'stale');
        assert.match(stale.lastState.reason, /^no tick for \d/);
        assert.equal(stale.transport, 'webtransport');
        own.child.kill('SIGCONT');
        const resumed = await live(p, i, 'webtransport', { ticks: stale.stats.ticksReceived + 1 });
        assert.equal(resumed.stats.sessions, 1, 'the same session came back to life');

        own.child.kill('SIGSTOP');
        const dead = await until(p, i, (r) => r.state === 'reconnecting', null, 'giving the silent session up');
        assert.match(dead.stats.lastError, /^no tick for \d/);
        own.child.kill('SIGCONT');
        await live(p, i, 'webtransport', { sessions: 2 });
      } finally {
        own.child.kill('SIGCONT');
        await p.context.close();
        await stopServer(own);
      }
    });

    test('a subscriber token from a function is asked for again until the server accepts it', async () => {
      const secret = 'client-test-secret-0123456789abcdef';
      const own = await startServer({ cars: CARS, extra: [...allowPage(), '--subscribe-secret', secret] });
      const token = execFileSync(BIN, ['token', '--secret', secret, '--ttl', '10m']).toString().trim();
      const p = await libraryPage(browser);
      try {
        await p.page.evaluate(() => { window.currentToken = null; });
        const wt = await start(p.page, { server: own.base }, { tokenFromPage: true });
        const ws = await start(p.page, { server: own.base, transport: 'websocket' }, { tokenFromPage: true });
        for (const i of [wt, ws]) {
          const refused = await until(p, i, (r) => r.stats.token === 'refused' && r.state === 'reconnecting', null, 'refused');
          assert.equal(refused.stats.tokenRequired, true);
          assert.match(refused.stats.lastError, /token may be missing, invalid or expired/);
          assert.equal(refused.stats.sessions, 0);
        }
        await p.page.evaluate((t) => { window.currentToken = t; }, token);
        const r = await live(p, wt, 'webtransport');
        assert.equal(r.stats.token, 'accepted');
        assert.equal(r.stats.fallbackReason, null, 'WebTransport itself took the token');
        assert.ok(r.tokenCalls >= 2, `token function called per attempt: ${r.tokenCalls}`);
        assert.equal((await live(p, ws, 'websocket')).stats.token, 'accepted');
      } finally {
        await p.context.close();
        await stopServer(own);
      }
    });

    test('a server that speaks protocol version 2 is closed with 4005 and not retried', async () => {
      const stub = await startVersion2Stub();
      const p = await libraryPage(browser);
      try {
        // One node whose Hello says version 2, one whose config.json does.
        const hello = await start(p.page, { server: `${stub.url}/hello-v2`, transport: 'websocket' });
        const config = await start(p.page, { server: `${stub.url}/config-v2` });
        for (const i of [hello, config]) {
          const r = await until(p, i, (x) => x.state === 'offline', null, 'offline');
          assert.match(r.lastState.reason, /version 2; this client speaks 1/);
          assert.equal(r.tickEvents, 0);
          assert.equal(r.carsNow, 0);
        }
        assert.deepEqual(stub.closeCodes, [4005], 'one session, closed by the page with 4005');
        assert.equal((await report(p.page, hello)).stats.lastClose.code, 4005);
      } finally {
        await p.context.close();
        await stub.close();
      }
    });
  });
}

/**
 * A stand-in for a future server (no real one speaks version 2): `/config-v2/config.json`
 * says protocol_version 2; `/hello-v2/config.json` says 1, and its WebSocket sends a Hello of
 * version 2 (the golden `hello` frame with its version byte changed) with the golden Roster
 * and State. Records the close code of every WebSocket session.
 */
async function startVersion2Stub() {
  const vectors = JSON.parse(readFileSync(join(ROOT, 'crates/fleetcast-proto/tests/vectors/wire.json'), 'utf8'));
  const frame = (n) => Buffer.from(vectors.stream.find((v) => v.name === n).hex, 'hex');
  const hello = frame('hello');
  assert.deepEqual([hello[1], hello[2]], [0, 1], 'tag 0, version 1');
  hello[2] = 2;
  const config = (version, prefix) => JSON.stringify({
    protocol_version: version, webtransport_port: 9, session_path: '/positions',
    websocket_path: '/positions.ws', tick_interval_ms: 1000, token_required: false,
  });
  const http = createServer((req, res) => {
    const m = req.url.match(/^\/(hello|config)-v2\/config\.json$/);
    if (!m) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json', 'access-control-allow-origin': '*' });
    res.end(config(m[1] === 'config' ? 2 : 1));
  });
  const closeCodes = [];
  const wss = new WebSocketServer({ server: http, path: '/hello-v2/positions.ws' });
  wss.on('connection', (ws) => {
    ws.on('close', (code) => closeCodes.push(code));
    ws.send(Buffer.concat([Buffer.of(0x00), hello, frame('roster'), frame('state')]));
  });
  await new Promise((resolve) => http.listen(0, '::', resolve));
  return {
    url: `http://localhost:${http.address().port}`,
    closeCodes,
    close: () => new Promise((resolve) => {
      for (const c of wss.clients) c.terminate();
      wss.close();
      http.closeAllConnections();
      http.close(resolve);
    }),
  };
}
