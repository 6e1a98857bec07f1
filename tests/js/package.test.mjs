// The npm package fleetcast-client (web-demo/package.json) as an adopter gets it, offline:
// packed to a tarball and installed from it, and installed from the directory; then imported
// by Node through its `exports`, type-checked by TypeScript (bundler and node16 resolution,
// strict), and bundled by esbuild. Also: the vendored Leaflet is byte for byte the pinned
// release. Run: node --test tests/js/package.test.mjs (after npm ci)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { ROOT } from './support/fleetcast-server.mjs';

const LIB = join(ROOT, 'web-demo');
const pkg = JSON.parse(readFileSync(join(LIB, 'package.json'), 'utf8'));
const TSC = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
let work;
let tarball;

/** Runs a command, returning its stdout; a failure shows its output. */
function run(cmd, args, cwd) {
  try {
    return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    throw new Error(`${cmd} ${args.join(' ')} failed:\n${e.stdout}\n${e.stderr}`);
  }
}

/** A consumer project in `dir` with fleetcast-client installed from `spec` (offline). */
function consumer(dir, spec) {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts', spec], dir);
  return dir;
}

before(() => {
  work = mkdtempSync(join(tmpdir(), 'fleetcast-package-'));
  const [packed] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', work], LIB));
  tarball = { path: join(work, packed.filename), files: packed.files.map((f) => f.path).sort() };
});
after(() => rmSync(work, { recursive: true, force: true }));

test('the tarball holds the library and nothing of the demo', () => {
  assert.deepEqual(tarball.files, [...pkg.files, 'package.json'].sort());
  // The library's own imports stay inside the package.
  for (const file of pkg.files.filter((f) => f.endsWith('.js'))) {
    for (const [, spec] of readFileSync(join(LIB, file), 'utf8').matchAll(/^(?:import|export)[^'"]*from '([^']+)'/gm)) {
      assert.ok(pkg.files.includes(spec.replace(/^\.\//, '')), `${file} imports ${spec}, which the package lacks`);
    }
  }
});

for (const how of ['tarball', 'directory']) {
  test(`installed from the ${how}: Node imports it through its exports, and only through them`, () => {
    const dir = consumer(join(work, how), how === 'tarball' ? tarball.path : LIB);
    const out = run('node', ['--input-type=module', '-e', `
      const lib = await import('fleetcast-client');
      const meta = (await import('fleetcast-client/package.json', { with: { type: 'json' } })).default;
      let hidden;
      try { await import('fleetcast-client/fleetcast-wire.js'); hidden = 'importable'; } catch (e) { hidden = e.code; }
      let checked;
      try { lib.connect({ server: 'ftp://x' }); } catch (e) { checked = e.message; }
      console.log(JSON.stringify({ exports: Object.keys(lib).sort(), version: meta.version, hidden, checked }));
    `], dir);
    assert.deepEqual(JSON.parse(out), {
      exports: ['DEFAULTS', 'FleetConnection', 'PROTOCOL_VERSION', 'STATES', 'connect'],
      version: pkg.version,
      hidden: 'ERR_PACKAGE_PATH_NOT_EXPORTED',
      checked: 'fleetcast: server "ftp://x" is not an http(s) URL',
    });
  });
}

test('TypeScript (strict) finds the declarations through exports, and they catch misuse', () => {
  const dir = consumer(join(work, 'typescript'), tarball.path);
  writeFileSync(join(dir, 'main.ts'), `
    import { connect, STATES, type Car, type State, type StateDetail } from 'fleetcast-client';
    const fleet = connect({ server: ['https://a.example', 'https://b.example'], transport: 'auto', token: async () => 'jwt' });
    fleet.addEventListener('tick', (e) => {
      const cars: Car[] = e.detail.cars;
      const where: [number, number] = [cars[0].lat, cars[0].lon];
      console.log(where, cars[0].ageS.toFixed(1), e.detail.tick);
    });
    fleet.addEventListener('state', (e) => {
      const d: StateDetail = e.detail;
      if (d.state === 'reconnecting') console.log(d.retryInMs, d.reason);
    });
    const s: State = fleet.state;
    const all: readonly State[] = STATES;
    console.log(s, all, fleet.stats.ticksReceived, fleet.area?.north, fleet.transport === 'webtransport');
    fleet.close();
    // @ts-expect-error: not a transport
    connect({ transport: 'quic' });
    // @ts-expect-error: a misspelt option
    connect({ trasport: 'websocket' });
    // @ts-expect-error: the detail of a tick has no 'positions'
    fleet.addEventListener('tick', (e) => e.detail.positions);
  `);
  for (const resolution of [['bundler', 'esnext'], ['node16', 'node16']]) {
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      compilerOptions: {
        strict: true, noEmit: true, target: 'es2022', lib: ['es2022', 'dom'],
        moduleResolution: resolution[0], module: resolution[1], types: [],
      },
      files: ['main.ts'],
    }));
    run('node', [TSC, '-p', 'tsconfig.json'], dir);
  }
  // And misuse is an error: the check above is not vacuous.
  writeFileSync(join(dir, 'main.ts'), "import { connect } from 'fleetcast-client';\nconnect({ transport: 'quic' });\n");
  assert.throws(() => run('node', [TSC, '-p', 'tsconfig.json'], dir), /main\.ts\(2,.*Type '"quic"' is not assignable/);
});

test('a bundler (esbuild) bundles it for the browser', async () => {
  const dir = consumer(join(work, 'bundler'), tarball.path);
  writeFileSync(join(dir, 'entry.js'), "export { connect, STATES } from 'fleetcast-client';\n");
  const esbuild = await import('esbuild');
  await esbuild.build({
    entryPoints: [join(dir, 'entry.js')], bundle: true, format: 'esm', platform: 'browser',
    outfile: join(dir, 'bundle.js'), absWorkingDir: dir, logLevel: 'warning',
  });
  const out = run('node', ['--input-type=module', '-e', `
    const b = await import('./bundle.js');
    let checked;
    try { b.connect({ transport: 'quic', server: 'http://a' }); } catch (e) { checked = e.message; }
    console.log(JSON.stringify({ states: b.STATES.length, checked }));
  `], dir);
  assert.deepEqual(JSON.parse(out), {
    states: 6,
    checked: 'fleetcast: transport must be one of auto, webtransport, websocket, not "quic"',
  });
});

test('the vendored Leaflet is byte for byte the pinned release, and the map page loads that one', () => {
  const { version } = JSON.parse(readFileSync(join(ROOT, 'node_modules', 'leaflet', 'package.json'), 'utf8'));
  const rootPkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
  assert.equal(rootPkg.devDependencies.leaflet, version, 'pinned exactly');
  const vendored = join(LIB, 'vendor', `leaflet-${version}`);
  assert.deepEqual(readdirSync(join(LIB, 'vendor')), [`leaflet-${version}`], 'one Leaflet, the pinned one');
  const dist = join(ROOT, 'node_modules', 'leaflet', 'dist');
  const pairs = [['leaflet.js', join(dist, 'leaflet.js')], ['leaflet.css', join(dist, 'leaflet.css')],
    ['LICENSE', join(ROOT, 'node_modules', 'leaflet', 'LICENSE')],
    ...readdirSync(join(dist, 'images')).map((f) => [`images/${f}`, join(dist, 'images', f)])];
  for (const [ours, theirs] of pairs) {
    assert.ok(readFileSync(join(vendored, ours)).equals(readFileSync(theirs)), `${ours} differs from the release`);
  }
  const html = readFileSync(join(LIB, 'map.html'), 'utf8');
  assert.ok(html.includes(`vendor/leaflet-${version}/leaflet.js`) && html.includes(`vendor/leaflet-${version}/leaflet.css`));
});
