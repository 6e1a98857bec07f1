// fleetcast-transport.js: opens one session over WebTransport or the WebSocket fallback and
// hands what arrives to two callbacks: `onStream(bytes)` for the reliable stream and
// `onDatagram(bytes)` for each datagram payload. The same bytes travel on both transports
// (PROTOCOL.md section 11); the callbacks never see which one carried them.
//
// A callback that throws ends the session from this side with the protocol's close code for
// the error (fleetcast-session.js closeFor: 5 for an unsupported version, 2 for bytes that do
// not decode; on the WebSocket 4000 + that code).

import { WS_CHANNEL_STREAM, WS_CHANNEL_DATAGRAM, CloseCode, wsCloseCode } from './fleetcast-wire.js';
import { closeFor } from './fleetcast-session.js';

/**
 * An open session.
 * @typedef {object} Session
 * @property {'webtransport'|'websocket'} name
 * @property {Promise<{code: number|null, reason: string, error: Error|null}>} closed resolves
 *   when the session has ended: `code` is the close code it ended with (the server's, or ours
 *   when this side closed it; a WebSocket close code on the WebSocket), null when the
 *   connection was lost without one; `error` is what a callback threw, if that ended it.
 * @property {(code: number, reason: string) => void} close ends it with a protocol close code.
 */

/** `promise`, or a rejection after `timeoutMs` or when `signal` aborts (with its reason). */
export function within(promise, { timeoutMs, signal, what }) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => reject(new Error(`${what} timed out after ${timeoutMs} ms`)), timeoutMs);
    const onAbort = () => reject(signal.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    });
  });
}

/** A WebSocket close reason: at most 123 bytes of UTF-8 (RFC 6455 section 5.5). */
function wsReason(reason) {
  let r = reason;
  while (new TextEncoder().encode(r).length > 123) r = r.slice(0, -1);
  return r;
}

/**
 * Opens a WebTransport session to `url`, trusting the certificates in `hashes` (none: the
 * system roots). Resolves with a Session once it is ready; rejects when it cannot open within
 * `timeoutMs` or `signal` aborts.
 */
export async function openWebTransport(url, { hashes, timeoutMs, signal, onStream, onDatagram }) {
  const wt = new WebTransport(url, hashes.length ? { serverCertificateHashes: hashes } : {});
  wt.closed.catch(() => {}); // observed below once it is open
  try {
    await within(wt.ready, { timeoutMs, signal, what: 'WebTransport handshake' });
  } catch (e) {
    try { wt.close(); } catch { /* it never opened */ }
    throw e;
  }

  let failure = null;
  /** Hands `value` to `callback`; a throw ends the session (returns false). */
  const deliver = (callback, value) => {
    try {
      callback(value);
      return true;
    } catch (e) {
      failure = e;
      const { code, reason } = closeFor(e);
      try { wt.close({ closeCode: code, reason }); } catch { /* already closed */ }
      return false;
    }
  };
  // A read that fails means the session ended: `closed` says how.
  (async () => {
    const streams = wt.incomingUnidirectionalStreams.getReader();
    const { value: stream, done } = await streams.read();
    if (done) return;
    const reader = stream.getReader();
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) {
        // The server finishes the stream only after its Goodbye, now read: end the session
        // from this side before the server's close could discard unread bytes (PROTOCOL.md 8).
        try { wt.close({ closeCode: CloseCode.Normal, reason: 'goodbye received' }); } catch { /* closed */ }
        return;
      }
      if (!deliver(onStream, value)) return;
    }
  })().catch(() => {});
  (async () => {
    const reader = wt.datagrams.readable.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || failure !== null || !deliver(onDatagram, value)) return;
    }
  })().catch(() => {});

  const closed = wt.closed.then(
    (info) => ({ code: info?.closeCode ?? 0, reason: info?.reason ?? '' }),
    (e) => ({ code: null, reason: String(e?.message ?? e) }),
  ).then((end) => ({ ...end, error: failure }));
  return {
    name: 'webtransport',
    closed,
    close: (code, reason) => {
      try { wt.close({ closeCode: code, reason }); } catch { /* already closed */ }
    },
  };
}

/**
 * Opens the WebSocket fallback at `url`. Resolves with a Session once it is open; rejects
 * when it cannot open within `timeoutMs` or `signal` aborts.
 */
export async function openWebSocket(url, { timeoutMs, signal, onStream, onDatagram }) {
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  let failure = null;
  const closeWith = (code, reason) => {
    // 1000 for a normal end, 4000 + the protocol's code otherwise (PROTOCOL.md 11.4).
    try { ws.close(code === CloseCode.Normal ? 1000 : wsCloseCode(code), wsReason(reason)); } catch { /* closed */ }
  };
  let ended;
  const closed = new Promise((resolve) => { ended = resolve; });
  ws.addEventListener('close', (ev) => ended({ code: ev.code, reason: ev.reason, error: failure }));
  ws.addEventListener('message', (ev) => {
    if (failure !== null || !(ev.data instanceof ArrayBuffer) || ev.data.byteLength === 0) return;
    const bytes = new Uint8Array(ev.data);
    try {
      // Unknown channel bytes are reserved for later versions: ignored.
      if (bytes[0] === WS_CHANNEL_STREAM) onStream(bytes.subarray(1));
      else if (bytes[0] === WS_CHANNEL_DATAGRAM) onDatagram(bytes.subarray(1));
    } catch (e) {
      failure = e;
      const { code, reason } = closeFor(e);
      closeWith(code, reason);
    }
  });
  const opened = new Promise((resolve, reject) => {
    ws.addEventListener('open', resolve, { once: true });
    ws.addEventListener('close', () => reject(new Error('WebSocket could not open')), { once: true });
  });
  try {
    await within(opened, { timeoutMs, signal, what: 'WebSocket open' });
  } catch (e) {
    try { ws.close(); } catch { /* never opened */ }
    throw e;
  }
  return { name: 'websocket', closed, close: closeWith };
}
