// The map page (web-demo/map.html: Leaflet, vendored, on top of fleetcast-client.js) in real
// browsers against a real `fleetcast serve`, over both transports, in every browser of
// FLEETCAST_BROWSERS. A small local tile server stands in for an operator's tile server.
// Run: scripts/test-browser.sh, or FLEETCAST_BIN=target/debug/fleetcast node --test tests/js/map.browser.test.mjs

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import { startServer, stopServer, cleanUpServers, ROOT } from './support/fleetcast-server.mjs';
import { BROWSERS, launch, newPage, waitFor } from './support/browsers.mjs';

const ARTIFACTS = join(ROOT, 'test-artifacts');
const CARS = 80;
/** A 1x1 grey PNG: every tile the tile server hands out. */
const TILE = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=', 'base64');

mkdirSync(ARTIFACTS, { recursive: true });
after(cleanUpServers);

/** Serves TILE for /tiles/{z}/{x}/{y}.png and records what was asked for. */
async function startTileServer() {
  const requests = [];
  const server = createServer((req, res) => {
    requests.push(req.url);
    if (/^\/tiles\/\d+\/\d+\/\d+\.png$/.test(req.url)) res.writeHead(200, { 'content-type': 'image/png' }).end(TILE);
    else res.writeHead(404).end();
  });
  await new Promise((resolve) => server.listen(0, '::', resolve));
  return {
    url: `http://localhost:${server.address().port}`,
    requests,
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(resolve);
    }),
  };
}

const describeState = () => {
  const { carList, map, ...rest } = window.fleetcast ?? {};
  return rest;
};

/** Metres between two points (equirectangular; fine over a few km). */
function metres(a, b) {
  const dn = (a.lat - b.lat) * 111320;
  const de = (a.lon - b.lon) * 111320 * Math.cos((a.lat * Math.PI) / 180);
  return Math.hypot(dn, de);
}

for (const name of BROWSERS) {
  describe(`map page in ${name}`, () => {
    let browser;
    let server;
    let tiles;
    let roads;
    before(async () => {
      server = await startServer({ cars: CARS });
      tiles = await startTileServer();
      roads = (await (await fetch(`http://[::1]:${server.httpPort}/roads.json`)).json()).roads.length;
      browser = await launch(name);
    });
    after(async () => {
      await browser?.close();
      await tiles?.close();
      if (server) await stopServer(server);
    });

    for (const transport of ['webtransport', 'websocket']) {
      test(`${transport}: every car a marker over the roads, gliding, with details on click and Enter`, async () => {
        const { context, page, logs } = await newPage(browser);
        const requested = [];
        page.on('request', (r) => requested.push(r.url()));
        // The WebTransport run also draws a base map from the operator's (here: local) tiles.
        const query = transport === 'websocket'
          ? '?transport=websocket'
          : `?tiles=${encodeURIComponent(`${tiles.url}/tiles/{z}/{x}/{y}.png`)}&attribution=Test%20tiles`;
        try {
          await page.goto(`${server.url}map.html${query}`);
          await waitFor(page, ([t, n]) => {
            const f = window.fleetcast;
            return f && f.connected && f.transport === t && f.cars === n && f.ticksReceived >= 2 && f.roads > 0;
          }, [transport, CARS], { logs, describe: describeState, what: `the map live on ${transport}` });

          // Every car is a marker inside the map, at its car's position; the roads are drawn.
          const view = await page.evaluate(() => {
            const box = document.getElementById('map').getBoundingClientRect();
            const icons = [...document.querySelectorAll('#map .leaflet-marker-icon')];
            return {
              icons: icons.length,
              inside: icons.filter((el) => {
                const r = el.getBoundingClientRect();
                const x = r.left + r.width / 2;
                const y = r.top + r.height / 2;
                return x > box.left && x < box.right && y > box.top && y < box.bottom;
              }).length,
              roadPaths: document.querySelectorAll('#map path.road').length,
              cars: window.fleetcast.carList(),
            };
          });
          assert.equal(view.icons, CARS, 'one marker per car');
          assert.equal(view.inside, CARS, 'every marker inside the map');
          assert.equal(view.roadPaths, roads, 'every road of /roads.json drawn');
          for (const c of view.cars) {
            // Dead reckoning goes at most three ticks past a fix: well under 100 m here.
            const d = metres({ lat: c.markerLat, lon: c.markerLon }, c);
            assert.ok(d < 100, `${c.label}: marker ${d.toFixed(1)} m from its fix`);
          }

          // Markers glide: a moving car's marker takes many small steps, never a jump.
          const moving = view.cars.find((c) => c.speedMps > 5);
          assert.ok(moving, 'a moving car');
          const path = await page.evaluate((id) => new Promise((resolve) => {
            const points = [];
            const step = () => {
              const c = window.fleetcast.carList().find((x) => x.id === id);
              points.push({ lat: c.markerLat, lon: c.markerLon });
              if (points.length < 40) requestAnimationFrame(step);
              else resolve(points);
            };
            requestAnimationFrame(step);
          }), moving.id);
          const steps = path.slice(1).map((p, i) => metres(p, path[i]));
          const distinct = new Set(path.map((p) => `${p.lat},${p.lon}`)).size;
          assert.ok(distinct >= 20, `the marker moved in ${distinct} of 40 frames`);
          assert.ok(Math.max(...steps) < 5, `largest step between frames ${Math.max(...steps).toFixed(2)} m`);

          // A click on a marker opens its details; so does Enter on a focused one. The marker
          // clicked has no other within three marker widths, so none can glide over it between
          // finding it and clicking it.
          const target = await page.evaluate(() => {
            const centres = [...document.querySelectorAll('#map .leaflet-marker-icon')].map((el) => {
              const r = el.getBoundingClientRect();
              return { el, x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width };
            });
            const bar = document.getElementById('bar').getBoundingClientRect();
            const alone = centres.find((c) => c.y > bar.bottom + 2 * c.w &&
              centres.every((o) => o === c || Math.hypot(o.x - c.x, o.y - c.y) > 3 * c.w) &&
              document.elementFromPoint(c.x, c.y)?.closest('.leaflet-marker-icon') === c.el);
            return alone ? { x: alone.x, y: alone.y, label: alone.el.title } : null;
          });
          assert.ok(target, 'a marker with no other near it');
          await page.mouse.click(target.x, target.y);
          await waitFor(page, (label) => document.querySelector('.leaflet-popup-content h2')?.textContent === label,
            target.label, {
              logs,
              what: `the popup of ${target.label}`,
              describe: () => ({ popup: document.querySelector('.leaflet-popup-content h2')?.textContent ?? null }),
            });
          const popup = await page.$eval('.leaflet-popup-content', (e) => e.textContent);
          assert.match(popup, /speed\d+ km\/h/);
          assert.match(popup, /fix taken\d+\.\d s ago/);
          await page.screenshot({ path: join(ARTIFACTS, `${name}-map-${transport}.png`) });

          const other = view.cars.find((c) => c.label !== target.label).label;
          await page.$eval(`#map .leaflet-marker-icon[title="${other}"]`, (el) => el.focus());
          await page.keyboard.press('Enter');
          await waitFor(page, (label) => document.querySelector('.leaflet-popup-content h2')?.textContent === label,
            other, { logs, what: `the popup of ${other} after Enter` });

          if (transport === 'webtransport') {
            assert.ok(tiles.requests.some((u) => /^\/tiles\/\d+\/\d+\/\d+\.png$/.test(u)), 'tiles were asked for');
            await waitFor(page, () => document.querySelectorAll('img.leaflet-tile-loaded').length > 0, null,
              { logs, what: 'a tile on the map' });
            assert.match(await page.$eval('.leaflet-control-attribution', (e) => e.textContent), /Test tiles/);
          }
          // Offline-ready: nothing was fetched from anywhere but this server (its HTTP side and,
          // as Firefox reports it, its WebTransport session) and the tile server.
          const ours = [server.url, `https://localhost:${server.wtPort}/`, tiles.url, 'data:'];
          const outside = requested.filter((u) => !ours.some((prefix) => u.startsWith(prefix)));
          assert.deepEqual(outside, []);
        } finally {
          await context.close();
        }
      });
    }
  });
}
