// Real browsers for the tests, driven by puppeteer-core: Debian's Chromium over the DevTools
// protocol and Debian's firefox-esr over WebDriver BiDi. Nothing is downloaded.
//
// FLEETCAST_BROWSERS (default "chromium,firefox") picks which ones run; CHROMIUM and FIREFOX
// override the executables.

import puppeteer from 'puppeteer-core';
import { WAIT_MS } from './fleetcast-server.mjs';

const EXECUTABLES = {
  chromium: process.env.CHROMIUM ?? '/usr/bin/chromium',
  firefox: process.env.FIREFOX ?? '/usr/bin/firefox-esr',
};

/** The browsers to test in, from FLEETCAST_BROWSERS. */
export const BROWSERS = (process.env.FLEETCAST_BROWSERS ?? 'chromium,firefox')
  .split(',').map((b) => b.trim()).filter(Boolean);
for (const b of BROWSERS) {
  if (!(b in EXECUTABLES)) throw new Error(`FLEETCAST_BROWSERS: unknown browser "${b}" (chromium, firefox)`);
}

/** Launches browser `name` headless. */
export async function launch(name) {
  if (name === 'firefox') {
    return puppeteer.launch({ browser: 'firefox', executablePath: EXECUTABLES.firefox, headless: true });
  }
  return puppeteer.launch({
    executablePath: EXECUTABLES.chromium,
    headless: true,
    args: process.getuid?.() === 0 ? ['--no-sandbox'] : [],
  });
}

/**
 * A fresh page in its own browser context that records console messages and page errors
 * (certificate problems show only there). `noWebTransport` deletes window.WebTransport before
 * any script of the page runs; `initScript` is a function run the same way.
 */
export async function newPage(browser, { noWebTransport = false, initScript = null, viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ ...viewport, deviceScaleFactor: 1 });
  if (noWebTransport) await page.evaluateOnNewDocument(() => { delete window.WebTransport; });
  if (initScript) await page.evaluateOnNewDocument(initScript);
  const logs = [];
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  return { context, page, logs };
}

/**
 * Waits until `fn(arg)`, run in the page, returns something truthy, and returns it. On a
 * timeout the error shows `describe()` (run in the page) and the page's console.
 */
export async function waitFor(page, fn, arg, { timeout = WAIT_MS, logs = [], describe = null, what = 'condition' } = {}) {
  try {
    const handle = await page.waitForFunction(fn, { timeout, polling: 100 }, arg);
    return await handle.jsonValue();
  } catch (e) {
    const state = describe ? await page.evaluate(describe).catch((err) => `(unavailable: ${err.message})`) : null;
    throw new Error(`waiting for ${what}: ${e.message}\nstate: ${JSON.stringify(state)}\nconsole:\n${logs.join('\n')}`);
  }
}
