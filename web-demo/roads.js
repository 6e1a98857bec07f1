// roads.js: the simulator's road network, which the demo pages draw under the cars. It comes
// from the server's /roads.json (demo-only, PROTOCOL.md section 2.2): segments in metres east
// and north of an origin, with a speed limit; no roads without the simulator.

import { localProjection } from './motion.js';

/** Speed limit from which a road counts as an arterial (drawn wider), m/s. */
export const MAJOR_ROAD_MPS = 14;

/** GET `server`/roads.json, or null when the server has none or cannot be reached. */
export async function fetchRoads(server) {
  try {
    const r = await fetch(`${server}/roads.json`, { cache: 'no-store' });
    return r.ok ? await r.json() : null;
  } catch {
    return null;
  }
}

/**
 * The roads as a GeoJSON FeatureCollection of LineStrings ([lon, lat] positions), each with
 * `limit_mps` and `major` properties. Malformed segments are left out.
 */
export function roadsToGeoJSON(roads) {
  const features = [];
  const ok = (p) => Array.isArray(p) && p.length === 2 && p.every(Number.isFinite);
  if (roads && Number.isFinite(roads.origin_lat_deg) && Number.isFinite(roads.origin_lon_deg)) {
    const proj = localProjection(roads.origin_lat_deg, roads.origin_lon_deg);
    for (const r of Array.isArray(roads.roads) ? roads.roads : []) {
      if (!ok(r?.a) || !ok(r?.b)) continue;
      const a = proj.toLatLon(r.a[0], r.a[1]);
      const b = proj.toLatLon(r.b[0], r.b[1]);
      const limit = Number.isFinite(r.limit_mps) ? r.limit_mps : 0;
      features.push({
        type: 'Feature',
        properties: { limit_mps: limit, major: limit >= MAJOR_ROAD_MPS },
        geometry: { type: 'LineString', coordinates: [[a.lon, a.lat], [b.lon, b.lat]] },
      });
    }
  }
  return { type: 'FeatureCollection', features };
}
