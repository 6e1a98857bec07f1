// Real-browser tests of the web demo (web-demo/index.html, drawn by app.js on top of
// fleetcast-client.js): real `fleetcast serve` processes, Debian's Chromium and firefox-esr
// driven by puppeteer-core, real WebTransport over QUIC on loopback and the real WebSocket
// fallback. The page over both transports, its keyboard and screen-reader access, in every
// browser of FLEETCAST_BROWSERS; the rest (close codes, fallback, phone, restarts, ingest,
// tokens, certificate renewal) in the first of them.
// Run: scripts/test-browser.sh (builds the binary first), or
//      FLEETCAST_BIN=target/debug/fleetcast node --test tests/js/demo.browser.test.mjs
// Screenshots land in test-artifacts/.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import { startServer, stopServer, health, cleanUpServers, ROOT, BIN, WAIT_MS } from './support/fleetcast-server.mjs';
import { BROWSERS, launch, newPage as openPage, waitFor } from './support/browsers.mjs';

const ARTIFACTS = join(ROOT, 'test-artifacts');
const CARS = 150;

mkdirSync(ARTIFACTS, { recursive: true });
after(cleanUpServers);

const fleetcast = (page) => page.evaluate(() => {
  const { carList, ...rest } = window.fleetcast;
  return rest;
});
const text = (page, selector) => page.$eval(selector, (e) => e.textContent);
const describeState = () => {
  const { carList, ...rest } = window.fleetcast ?? {};
  return rest;
};

/** Waits for a live session on `transport` with every car and at least `ticks` ticks. */
function waitLive(page, transport, ticks, logs) {
  return waitFor(page, ([t, n, k]) => {
    const f = window.fleetcast;
    return f && f.connected && f.transport === t && f.initialCars === n && f.cars === n &&
      f.ticksReceived >= k;
  }, [transport, CARS, ticks], { logs, describe: describeState, what: `live on ${transport}` });
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

for (const name of BROWSERS) {
  describe(`web demo in ${name}`, () => {
    let browser;
    let server;
    before(async () => {
      server = await startServer();
      browser = await launch(name);
    });
    after(async () => {
      await browser?.close();
      if (server) await stopServer(server);
    });

    test('WebTransport: every car drawn; a click and the keyboard both open a car\'s details', async () => {
      const { context, page, logs } = await openPage(browser);
      try {
        await page.goto(server.url);
        await waitLive(page, 'webtransport', 3, logs);
        await assertCarsDrawn(page);
        const f = await fleetcast(page);
        assert.equal(f.fallbackReason, null);
        assert.ok(f.latencyP50Ms !== null && f.latencyP50Ms >= 0);
        assert.match(await text(page, '#conn'), /live · WebTransport/);
        assert.equal(await text(page, '#s-cars'), String(CARS));
        await waitFor(page, () => window.fleetcast.bytesPerSecond > 0, null, { logs, what: 'a data rate' });

        // A click on a car shows its details, with the time since its fix counting on.
        const car = (await page.evaluate(() => window.fleetcast.carList()))
          .find((c) => c.screen[0] > 350 && c.screen[1] > 250 && c.screen[0] < 1000);
        await page.mouse.click(car.screen[0], car.screen[1]);
        await page.waitForSelector('#details:not([hidden])', { timeout: 5000 });
        const label = await text(page, '#d-label');
        const shown = (await page.evaluate(() => window.fleetcast.carList())).find((c) => c.label === label);
        assert.ok(shown, `details show a real car: ${label}`);
        assert.match(await text(page, '#d-speed'), /km\/h$/);
        assert.match(await text(page, '#d-pos'), /^52\.\d+, 4\.\d+$/);
        const age = await text(page, '#d-age');
        assert.match(age, /^\d+\.\d s ago$/);
        await waitFor(page, (a) => document.getElementById('d-age').textContent !== a, age,
          { logs, what: 'the fix age to count on' });
        await page.screenshot({ path: join(ARTIFACTS, `${name}-webtransport.png`) });
        await page.keyboard.press('Escape');
        await page.waitForSelector('#details[hidden]', { timeout: 5000 });

        // The keyboard reaches every car through the list: open it, Tab to a car, Enter.
        assert.equal(await text(page, '#car-count'), String(CARS));
        await page.focus('#car-list-panel summary');
        await page.keyboard.press('Enter');
        // Firefox stops on the scrollable list itself first; a car button comes next.
        for (let i = 0; i < 3 && !(await page.evaluate(() => document.activeElement.matches('#car-list button'))); i += 1) {
          await page.keyboard.press('Tab');
        }
        const focused = await page.evaluate(() => document.activeElement.textContent);
        assert.match(focused, /^FC-\d{4} \d+ km\/h$/, 'a car button with its speed in words');
        await page.keyboard.press('Enter');
        await page.waitForSelector('#details:not([hidden])', { timeout: 5000 });
        assert.equal(await text(page, '#d-label'), focused.split(' ')[0]);
        assert.match(await text(page, '#announce'), new RegExp(`^${focused.split(' ')[0]}: \\d+ km/h, heading [NESW]{1,2}$`));
        assert.equal(await page.$$eval('#car-list button', (bs) => bs.length), CARS);
      } finally {
        await context.close();
      }
    });

    test('WebSocket forced with ?transport=websocket; the page tells screen readers little and often enough', async () => {
      const { context, page, logs } = await openPage(browser);
      try {
        await page.goto(`${server.url}?transport=websocket`);
        await waitLive(page, 'websocket', 3, logs);
        await assertCarsDrawn(page);
        assert.match(await text(page, '#conn'), /live · WebSocket/);
        // The canvas is an image with a text alternative; speed has a legend in words.
        assert.equal(await page.$eval('#map', (c) => c.getAttribute('role')), 'img');
        assert.match(await page.$eval('#map', (c) => document.getElementById(c.getAttribute('aria-describedby')).textContent),
          /cars/);
        assert.equal(await page.$$eval('#legend-ticks span', (s) => s.map((x) => x.textContent).join(' ')), '0 20 40 60');
        // Only two live regions, and the status one does not change while the state does not:
        // nothing is re-announced every frame.
        assert.deepEqual(await page.$$eval('[aria-live], [role="status"], [role="alert"]', (els) => els.map((e) => e.id)),
          ['conn', 'announce']);
        const changes = await page.evaluate(() => new Promise((resolve) => {
          let n = 0;
          const o = new MutationObserver((records) => { n += records.length; });
          o.observe(document.getElementById('conn'), { childList: true, characterData: true, subtree: true });
          const start = window.fleetcast.ticksReceived;
          const check = () => {
            if (window.fleetcast.ticksReceived >= start + 2) {
              o.disconnect();
              resolve({ n, state: window.fleetcast.state });
            } else setTimeout(check, 50);
          };
          check();
        }));
        assert.deepEqual(changes, { n: 0, state: 'live' }, 'the status region stayed as it was over two ticks');
        await page.screenshot({ path: join(ARTIFACTS, `${name}-websocket.png`) });
      } finally {
        await context.close();
      }
    });
  });
}

describe(`web demo, the rest, in ${BROWSERS[0]}`, () => {
  let browser;
  before(async () => {
    browser = await launch(BROWSERS[0]);
  });
  after(async () => {
    await browser?.close();
  });
  const newPage = (options) => openPage(browser, options);

  test('a session the server closes shows its close code and reason in the page', async () => {
    // The server ends a session with CLOSE_WEBTRANSPORT_SESSION, so the browser's
    // `WebTransport.closed` resolves with the server's code and reason (PROTOCOL.md section 8).
    // To make it close one, the page breaks protocol v1: it sends a datagram.
    const server = await startServer();
    const { context, page, logs } = await newPage({
      initScript: () => {
        const Original = window.WebTransport;
        window.__sessions = [];
        window.WebTransport = class extends Original {
          constructor(...args) {
            super(...args);
            window.__sessions.push(this);
          }
        };
      },
    });
    try {
      await page.goto(server.url);
      await waitLive(page, 'webtransport', 2, logs);
      await page.evaluate(async () => {
        const writer = window.__sessions.at(-1).datagrams.writable.getWriter();
        await writer.write(new Uint8Array([1, 2, 3]));
      });
      await waitFor(page, () => window.fleetcast.lastClose !== null, null, { logs, what: 'the close' });
      const f = await fleetcast(page);
      if (process.env.FLEETCAST_DEBUG_CLOSE) process.stderr.write(`${JSON.stringify(f.lastClose)}\n${server.log()}\n`);
      assert.equal(f.lastClose.code, 2, `ProtocolViolation: ${JSON.stringify(f.lastClose)}`);
      assert.match(f.lastClose.reason, /clients must not send datagrams/);
      // And the page carries on with a new session.
      await waitFor(page, () => window.fleetcast.sessions >= 2 && window.fleetcast.connected, null,
        { logs, what: 'a new session' });
    } finally {
      await context.close();
      await stopServer(server);
    }
  });

  test('WebSocket fallback when the browser has no WebTransport', async () => {
    const server = await startServer();
    const { context, page, logs } = await newPage({ noWebTransport: true });
    try {
      await page.goto(server.url);
      await waitLive(page, 'websocket', 3, logs);
      await assertCarsDrawn(page);
      const f = await fleetcast(page);
      assert.match(f.fallbackReason, /no WebTransport/);
      assert.match(await text(page, '#notice'), /WebSocket fallback/);
      await page.screenshot({ path: join(ARTIFACTS, 'websocket-fallback.png') });
    } finally {
      await context.close();
      await stopServer(server);
    }
  });

  test('phone-sized viewport shows the whole fleet too', async () => {
    const server = await startServer();
    const { context, page, logs } = await newPage({ viewport: { width: 390, height: 844 } });
    try {
      await page.goto(server.url);
      await waitLive(page, 'webtransport', 2, logs);
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
      const { context, page, logs } = await newPage();
      try {
        const query = transport === 'websocket' ? '?transport=websocket' : '';
        await page.goto(server.url + query);
        await waitLive(page, transport, 3, logs);
        const before = await fleetcast(page);
        assert.equal(before.sessions, 1);

        const { httpPort, wtPort } = server;
        const exit = await stopServer(server);
        assert.equal(exit.code, 0, `server exits cleanly on SIGTERM:\n${server.log()}`);
        await waitFor(page, () => !window.fleetcast.connected, null, { logs, what: 'the disconnect' });
        await waitFor(page, () => /reconnecting/.test(document.getElementById('conn').textContent), null,
          { logs, what: 'reconnecting on the page' });
        const down = await fleetcast(page);
        assert.equal(down.lastGoodbye?.code, 1, 'the page saw the going-away goodbye');
        assert.match(await text(page, '#notice'), /Server restarting/);
        await page.screenshot({ path: join(ARTIFACTS, `${transport}-reconnecting.png`) });

        // Same ports, new certificate directory: a new self-signed certificate and hash.
        server = await startServer({ httpPort, wtPort });
        await waitFor(page, ([t, k]) => window.fleetcast.sessions >= 2 && window.fleetcast.connected &&
          window.fleetcast.transport === t && window.fleetcast.ticksReceived >= k,
        [transport, before.ticksReceived + 3], { logs, describe: describeState, what: 'reconnected' });
        await assertCarsDrawn(page);
        await page.screenshot({ path: join(ARTIFACTS, `${transport}-reconnected.png`) });
      } finally {
        await context.close();
        await stopServer(server);
      }
    });
  }

  test('ingest: posted cars appear on the page at their positions with their fix time', async () => {
    const token = 'browser-test-publisher-token';
    const server = await startServer({ extra: ['--feed', 'ingest', '--publish-token', token] });
    const { context, page, logs } = await newPage();
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
      // the next tick): wait for all 100, whichever way they came.
      await waitFor(page, () => {
        const f = window.fleetcast;
        return f && f.connected && f.transport === 'webtransport' && f.ticksReceived >= 2 && f.cars === 100;
      }, null, { logs, describe: describeState, what: '100 posted cars' });
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
        // The wire gives the age at the tick in whole 100 ms steps (rounded down), so the fix
        // time the page works out is at most 100 ms (plus the trip here) after the real one.
        const late = c.fixTimeMs - fixMs;
        assert.ok(late >= -1 && late < 100 + 250, `${c.label}: fix time ${late.toFixed(1)} ms after the posted one`);
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
        await waitLive(ok.page, 'webtransport', 3, ok.logs);
        await assertCarsDrawn(ok.page);
        const f = await fleetcast(ok.page);
        assert.equal(f.tokenRequired, true);
        assert.equal(f.fallbackReason, null, 'WebTransport itself accepted the token');
        assert.equal(await text(ok.page, '#s-token'), 'accepted');
      } finally {
        await ok.context.close();
      }

      const { context, page, logs } = await newPage();
      try {
        await page.goto(server.url);
        await waitFor(page, (t) => window.fleetcast.tokenStatus === t && window.fleetcast.reconnects >= 2, refused,
          { logs, describe: describeState, what: 'the refusal' });
        const f = await fleetcast(page);
        assert.equal(f.connected, false);
        assert.equal(f.sessions, 0, 'no session ever opened');
        assert.equal(f.cars, 0);
        assert.equal(f.ticksReceived, 0, 'no position reached the page');
        assert.ok(await page.$eval('#s-token-row', (e) => !e.hidden));
        assert.equal(await text(page, '#s-token'), refused);
        assert.match(await text(page, '#notice'), /requires a subscriber token/);
        // The server refused it on both transports (the page fell back to the WebSocket).
        const { counters } = await health(server);
        assert.ok(counters.refused_unauthorized >= 1, JSON.stringify(counters));
        assert.ok(counters.ws_refused_unauthorized >= 1, JSON.stringify(counters));
        assert.equal(counters.sessions_accepted, 1, 'only the page with the token');
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
    const { context, page, logs } = await newPage();
    const hashes = async () =>
      (await (await fetch(`http://[::1]:${server.httpPort}/certificate.sha256`)).text()).trim().split('\n');
    const until = async (cond, what) => {
      const deadline = Date.now() + WAIT_MS;
      while (!(await cond())) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${server.log()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    try {
      const first = await hashes();
      assert.equal(first.length, 1);
      await until(async () => (await hashes()).length === 2, 'the next hash to be published');
      const [current, next] = await hashes();
      assert.equal(current, first[0]);

      // A page opened now passes both hashes to WebTransport.
      await page.goto(server.url);
      await waitLive(page, 'webtransport', 1, logs);
      assert.equal((await fleetcast(page)).certificateHashes, 2);
      const sessions = (await fleetcast(page)).sessions;

      // The server switches to the next certificate: the open session goes on, no reconnect.
      await until(async () => {
        const h = await hashes();
        return h.length === 1 && h[0] === next;
      }, 'the switch to the next certificate');
      const before = (await fleetcast(page)).ticksReceived;
      await waitFor(page, (n) => window.fleetcast.ticksReceived > n + 2, before, { logs, what: 'more ticks' });
      const after = await fleetcast(page);
      assert.equal(after.sessions, sessions, 'the session opened before the switch is still the one');
      assert.equal(after.transport, 'webtransport');

      // A page loaded after the switch trusts the new certificate and goes live over WebTransport.
      await page.reload();
      await waitLive(page, 'webtransport', 1, logs);
    } finally {
      await context.close();
      await stopServer(server);
    }
  });
});
