// motion.js: smooth motion between fixes, shared by the demo pages. Between ticks a car is
// dead-reckoned from its heading and speed (for a few tick intervals at most, then it waits);
// when a new fix arrives the car does not jump: the difference between where it is drawn and
// where the new fix predicts it fades out over about a third of a second. Positions are metres
// east and north of an origin (localProjection); times are seconds on the page's clock.

/** Metres per degree of latitude, as the server's projection (PROTOCOL.md section 6). */
export const METRES_PER_DEGREE = 111320.0;
/** Time constant of the ease from the drawn position to the corrected one, seconds. */
export const EASE_S = 0.35;
/** Longest a car is dead-reckoned past its last fix, in tick intervals (then it waits). */
export const MAX_EXTRAPOLATE_TICKS = 3;

/** How far past a fix to reckon, seconds, for ticks `tickIntervalMs` apart (default 1 s). */
export const horizonS = (tickIntervalMs) => (MAX_EXTRAPOLATE_TICKS * (tickIntervalMs ?? 1000)) / 1000;

/** Converts between degrees and metres east/north of (lat0, lon0), as the server projects. */
export function localProjection(lat0, lon0) {
  const perLon = METRES_PER_DEGREE * Math.cos((lat0 * Math.PI) / 180);
  return {
    toMetres: (lat, lon) => ({ e: (lon - lon0) * perLon, n: (lat - lat0) * METRES_PER_DEGREE }),
    toLatLon: (e, n) => ({ lat: lat0 + n / METRES_PER_DEGREE, lon: lon0 + e / perLon }),
  };
}

/**
 * A fix for a car of fleetcast-client.js at page time `t`: where it was (metres), its velocity
 * (m/s east and north) and when it was taken (`t` minus the car's age).
 */
export function fixOf(car, projection, t) {
  const { e, n } = projection.toMetres(car.lat, car.lon);
  const rad = (car.headingDeg * Math.PI) / 180;
  return { e, n, ve: car.speedMps * Math.sin(rad), vn: car.speedMps * Math.cos(rad), at: t - car.ageS };
}

/** Where `fix` puts the car at time `t`: dead reckoning for at most `horizonS` past the fix. */
function predicted(fix, t, horizonS) {
  const dt = Math.min(Math.max(t - fix.at, 0), horizonS);
  return { e: fix.e + fix.ve * dt, n: fix.n + fix.vn * dt };
}

/** One car's drawn position over time. */
export class Glide {
  /** Starts at `fix` (from fixOf) at time `t`; reckons at most `horizonS` past a fix. */
  constructor(fix, t, horizonS) {
    this.fix = fix;
    this.horizonS = horizonS;
    this.off = { e: 0, n: 0, at: t };
  }

  /** Drawn position at time `t`: the prediction plus a correction that fades out. */
  at(t) {
    const p = predicted(this.fix, t, this.horizonS);
    const k = Math.exp(-(t - this.off.at) / EASE_S);
    return { e: p.e + this.off.e * k, n: p.n + this.off.n * k };
  }

  /** Takes a new fix at time `t` without a jump: the old drawn position eases into the new path. */
  retarget(fix, t) {
    const was = this.at(t);
    const will = predicted(fix, t, this.horizonS);
    this.fix = fix;
    this.off = { e: was.e - will.e, n: was.n - will.n, at: t };
  }
}

/**
 * Brings `entries` (a Map id -> {car, glide, ...}) up to the cars of a tick event at time `t`:
 * a new car gets the entry `create(car, glide)` returns, a car with a newer fix glides towards
 * it, and the entry of a car that left goes to `removed(entry)` and out of the map.
 */
export function followCars(entries, cars, projection, t, horizonS, { create, removed = () => {} }) {
  const seen = new Set();
  for (const car of cars) {
    seen.add(car.id);
    const entry = entries.get(car.id);
    if (!entry) {
      entries.set(car.id, create(car, new Glide(fixOf(car, projection, t), t, horizonS)));
    } else {
      if (entry.car.tick !== car.tick) entry.glide.retarget(fixOf(car, projection, t), t);
      entry.car = car;
    }
  }
  for (const [id, entry] of entries) {
    if (!seen.has(id)) {
      removed(entry);
      entries.delete(id);
    }
  }
}

/** `from` turned towards `to` (degrees) by the fraction `k` of the shorter way. */
export function turnTowards(from, to, k) {
  const d = ((to - from + 540) % 360) - 180;
  return from + d * k;
}
