// Starts and stops real `fleetcast serve` processes for the JavaScript tests, on ephemeral
// ports parsed from the server's log, each with a temporary --cert-dir (a new self-signed
// certificate). The binary: FLEETCAST_BIN, else $CARGO_TARGET_DIR/debug/fleetcast.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository's root directory. */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
/** The fleetcast binary under test. */
export const BIN = process.env.FLEETCAST_BIN ??
  join(process.env.CARGO_TARGET_DIR ?? join(ROOT, 'target'), 'debug', 'fleetcast');
/** How long a test waits for anything (a server start, a page condition), ms. */
export const WAIT_MS = 30_000;

const tempDirs = [];
const running = new Set();

/**
 * Starts `fleetcast serve` with `cars` simulated cars (and `extra` arguments) serving
 * web-demo/; resolves once its log names both ports with {child, exited, httpPort, wtPort,
 * url, base, log()}: `url` is the web demo (http://localhost:PORT/), `base` the same without
 * the slash, as fleetcast-client.js takes it.
 */
export function startServer({ httpPort = 0, wtPort = 0, cars = 150, extra = [] } = {}) {
  const certDir = mkdtempSync(join(tmpdir(), 'fleetcast-certs-'));
  tempDirs.push(certDir);
  const child = spawn(BIN, [
    'serve',
    '--wt-listen', `[::]:${wtPort}`,
    '--http-listen', `[::1]:${httpPort}`,
    '--cars', String(cars),
    '--cert-dir', certDir,
    '--web-root', join(ROOT, 'web-demo'),
    '--shutdown-timeout', '2s',
    ...extra,
  ], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NO_COLOR: '1', RUST_LOG: 'info' } });
  running.add(child);
  let log = '';
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    running.delete(child);
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
          base: `http://localhost:${http[1]}`,
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

/** Sends SIGTERM and resolves with the exit {code, signal}. */
export async function stopServer(server) {
  server.child.kill('SIGTERM');
  return server.exited;
}

/** GET /healthz of `server` (JSON). */
export async function health(server) {
  return (await fetch(`http://[::1]:${server.httpPort}/healthz`)).json();
}

/** Stops every server still running and removes the certificate directories. */
export function cleanUpServers() {
  for (const child of running) {
    child.kill('SIGCONT'); // a test may have stopped it
    child.kill('SIGTERM');
  }
  for (const d of tempDirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
