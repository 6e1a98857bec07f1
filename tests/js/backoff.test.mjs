// The web demo's reconnect schedule (web-demo/backoff.js): node --test tests/js/backoff.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BACKOFF_BASE_MS, BACKOFF_CAP_MS, retryWindowMs, retryDelayMs,
} from '../../web-demo/backoff.js';

test('window doubles from 1 s up to the 8 s cap (as src/backoff.rs)', () => {
  assert.equal(BACKOFF_BASE_MS, 1000);
  assert.equal(BACKOFF_CAP_MS, 8000);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((a) => retryWindowMs(a)),
    [1000, 2000, 4000, 8000, 8000, 8000, 8000]);
  assert.equal(retryWindowMs(1e9), 8000);
  assert.equal(retryWindowMs(-3), 1000);
});

test('delay is anywhere in the window (full jitter)', () => {
  assert.equal(retryDelayMs(0, 0), 0);
  assert.equal(retryDelayMs(0, 0.5), 500);
  assert.equal(retryDelayMs(2, 0.25), 1000);
  assert.ok(retryDelayMs(0, 0.999999) < 1000);
  assert.equal(retryDelayMs(0, NaN), 0);
  assert.equal(retryDelayMs(0, 7), 1000);
});

test('a population that lost the server together comes back spread over the window', () => {
  // 10,000 pages, evenly spread samples: every 100 ms of the first window gets a tenth. The
  // schedule before issue 8 (250 + random * 250 ms) put every one of them into 250-500 ms.
  const buckets = new Array(10).fill(0);
  for (let i = 0; i < 10000; i += 1) {
    buckets[Math.floor(retryDelayMs(0, (i + 0.5) / 10000) / 100)] += 1;
  }
  assert.deepEqual(buckets, new Array(10).fill(1000));
});
