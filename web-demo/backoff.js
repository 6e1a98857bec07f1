// Reconnect backoff for the web demo: full jitter over a window that doubles with every failed
// attempt (pure; the caller passes Math.random()). The same schedule as src/backoff.rs, which
// the load generator (`fleetcast swarm --reconnect`) uses to stand in for a browser population:
// keep the two in step.
//
// Why full jitter: after a server restart every page loses its session at the same moment. A
// wait drawn from the whole window spreads their returns evenly over it (10,000 pages over the
// first 1 s window: ~10,000 handshakes a second, not all of them in the same 250 ms as before),
// and each failed attempt doubles the window, so a server still down or refusing sees fewer
// attempts per second, not more.

/** Window of the first attempt after a session that worked, milliseconds. */
export const BACKOFF_BASE_MS = 1000;
/** Largest window, milliseconds. */
export const BACKOFF_CAP_MS = 8000;

/** The window for `attempt` (0 after a session that worked, +1 per failure since), in ms. */
export function retryWindowMs(attempt, baseMs = BACKOFF_BASE_MS, capMs = BACKOFF_CAP_MS) {
  const a = Math.max(0, Math.min(30, Math.floor(attempt)));
  return Math.min(capMs, baseMs * 2 ** a);
}

/** The wait before `attempt` for a uniform sample `unit` in [0, 1) (clamped there), in ms. */
export function retryDelayMs(attempt, unit, baseMs = BACKOFF_BASE_MS, capMs = BACKOFF_CAP_MS) {
  const u = Number.isFinite(unit) ? Math.min(1, Math.max(0, unit)) : 0;
  return retryWindowMs(attempt, baseMs, capMs) * u;
}
