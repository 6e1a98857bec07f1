// The demo pages' helpers in Node: the projection, smooth motion between fixes (motion.js),
// the road network as GeoJSON (roads.js) and the options a page takes from its address
// (page-options.js). Run: node --test tests/js/pages-core.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { localProjection, fixOf, Glide, turnTowards, followCars, EASE_S } from '../../web-demo/motion.js';
import { roadsToGeoJSON } from '../../web-demo/roads.js';
import { pageOptions } from '../../web-demo/page-options.js';
import { toLatLon } from '../../web-demo/fleetcast-wire.js';

const near = (a, b, eps, what) => assert.ok(Math.abs(a - b) <= eps, `${what}: ${a} is not ${b} ± ${eps}`);

test('projection: the inverse of the server\'s (fleetcast-wire.js toLatLon), both ways', () => {
  const quant = { origin_lat_deg: 52.35, origin_lon_deg: 4.86 };
  const p = localProjection(52.35, 4.86);
  for (const [e, n] of [[0, 0], [1234.5, 3210.25], [4000, 4000]]) {
    const { lat, lon } = toLatLon(quant, e, n);
    assert.deepEqual(p.toLatLon(e, n), { lat, lon });
    const m = p.toMetres(lat, lon);
    near(m.e, e, 1e-6, 'east');
    near(m.n, n, 1e-6, 'north');
  }
});

test('motion: a car is dead-reckoned along its heading, for at most the horizon', () => {
  const p = localProjection(52.35, 4.86);
  const { lat, lon } = p.toLatLon(100, 200);
  // Heading 90° (east) at 10 m/s; its fix is 0.5 s old at t = 10.
  const fix = fixOf({ lat, lon, headingDeg: 90, speedMps: 10, ageS: 0.5 }, p, 10);
  near(fix.at, 9.5, 1e-12, 'fix time');
  const g = new Glide(fix, 10, 3);
  near(g.at(10).e, 105, 1e-6, 'east at t=10');
  near(g.at(10).n, 200, 1e-6, 'north at t=10');
  near(g.at(12).e, 125, 1e-6, 'east at t=12');
  near(g.at(20).e, 130, 1e-6, 'waits after 3 s past the fix');
});

test('motion: a new fix does not make the car jump; the correction fades out', () => {
  const p = localProjection(52.35, 4.86);
  const at = (e, n, ageS) => fixOf({ ...p.toLatLon(e, n), headingDeg: 0, speedMps: 0, ageS }, p, 0);
  const g = new Glide(at(0, 0, 0), 0, 3);
  g.retarget({ ...at(10, 0, 0), at: 1 }, 1); // the next fix is 10 m further east
  near(g.at(1).e, 0, 1e-9, 'where it was drawn, at the moment of the fix');
  near(g.at(1 + EASE_S).e, 10 - 10 / Math.E, 1e-9, 'one time constant later');
  near(g.at(1 + 20 * EASE_S).e, 10, 1e-6, 'then on the new fix');
});

test('motion: followCars adds new cars, glides known ones to a newer fix, drops those that left', () => {
  const p = localProjection(52.35, 4.86);
  const car = (id, e, tick) => ({ id, label: `car ${id}`, ...p.toLatLon(e, 0), headingDeg: 90, speedMps: 0, ageS: 0, tick });
  const entries = new Map();
  const removed = [];
  const opts = { create: (c, glide) => ({ car: c, glide, made: true }), removed: (e) => removed.push(e.car.id) };
  followCars(entries, [car(1, 0, 10), car(2, 50, 10)], p, 0, 3, opts);
  assert.deepEqual([...entries.keys()], [1, 2]);
  const first = entries.get(1);
  followCars(entries, [car(1, 10, 11), car(3, 0, 11)], p, 1, 3, opts);
  assert.deepEqual([...entries.keys()], [1, 3]);
  assert.deepEqual(removed, [2]);
  assert.equal(entries.get(1), first, 'the same entry, updated');
  assert.equal(entries.get(1).car.tick, 11);
  near(entries.get(1).glide.at(1).e, 0, 1e-9, 'no jump when the new fix arrives');
  near(entries.get(1).glide.at(30).e, 10, 1e-6, 'then on the new fix');
  // The same tick again changes nothing about the glide.
  const glide = { ...entries.get(1).glide.off };
  followCars(entries, [car(1, 99, 11), car(3, 0, 11)], p, 2, 3, opts);
  assert.deepEqual(entries.get(1).glide.off, glide);
});

test('motion: headings turn the shorter way round', () => {
  assert.equal(turnTowards(350, 10, 0.5), 360);
  assert.equal(turnTowards(10, 350, 0.5), 0);
  const mod = (a) => ((a % 360) + 360) % 360;
  assert.equal(mod(turnTowards(90, 270, 1)), 270, 'half way round: either way, arriving at 270');
  assert.equal(turnTowards(0, 90, 0.25), 22.5);
});

test('roads: segments in metres become GeoJSON LineStrings in degrees; bad ones are left out', () => {
  const roads = {
    origin_lat_deg: 52.35,
    origin_lon_deg: 4.86,
    roads: [
      { a: [200, 200], b: [200, 3400], limit_mps: 13.9 },
      { a: [0, 0], b: [1000, 0], limit_mps: 16.7 },
      { a: [0, 0], b: ['x', 0], limit_mps: 10 },
      { a: [0], b: [1, 1] },
      null,
    ],
  };
  const geo = roadsToGeoJSON(roads);
  assert.equal(geo.type, 'FeatureCollection');
  assert.equal(geo.features.length, 2);
  const [side, main] = geo.features;
  assert.deepEqual(side.properties, { limit_mps: 13.9, major: false });
  assert.deepEqual(main.properties, { limit_mps: 16.7, major: true });
  const quant = { origin_lat_deg: 52.35, origin_lon_deg: 4.86 };
  const b = toLatLon(quant, 200, 3400);
  assert.deepEqual(side.geometry, {
    type: 'LineString',
    coordinates: [[toLatLon(quant, 200, 200).lon, toLatLon(quant, 200, 200).lat], [b.lon, b.lat]],
  });
  assert.deepEqual(roadsToGeoJSON(null).features, []);
  assert.deepEqual(roadsToGeoJSON({ roads: [] }).features, []);
});

test('page options: ?server= (one or several), ?transport= and ?token= become connect() options', () => {
  assert.deepEqual(pageOptions(''), {});
  assert.deepEqual(pageOptions('?server=http://a:8080,%20http://b:8080&transport=websocket&token=t.k.n'), {
    server: ['http://a:8080', 'http://b:8080'], transport: 'websocket', token: 't.k.n',
  });
  assert.deepEqual(pageOptions('?token='), {}, 'an empty token is no token');
});
