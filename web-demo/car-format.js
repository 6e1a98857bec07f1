// car-format.js: how the demo pages show a car of fleetcast-client.js in words and colour.

const COMPASS = ['N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW'];
/** Speeds the colour legend names, km/h. */
export const LEGEND_KMH = [0, 20, 40, 60];

/** A speed in m/s as whole km/h: "37 km/h". */
export const kmh = (mps) => `${(mps * 3.6).toFixed(0)} km/h`;

/** The compass point nearest a heading in degrees: "NE". */
export const compass = (deg) => COMPASS[Math.round(deg / 45) % 8];

/** "90.0° E". */
export const headingText = (deg) => `${deg.toFixed(1)}° ${compass(deg)}`;

/** Seconds since the car's fix at wall time `nowMs`: "2.3 s ago". */
export const fixAgeText = (car, nowMs) => `${Math.max(0, (nowMs - car.fixTimeMs) / 1000).toFixed(1)} s ago`;

/** A car's colour for its speed: slow = warm, fast = cool, always saturated against grey roads. */
export function carColour(mps) {
  const hue = Math.max(0, Math.min(200, mps * 12));
  return `hsl(${hue} 90% 58%)`;
}
