// A small static file server for test pages that live on an origin of their own (like a
// customer's dashboard), apart from the fleetcast servers they connect to.

import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { join, normalize, extname, sep } from 'node:path';

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
};

/**
 * Serves `mounts` ({'/lib/': '/abs/dir', '/': '/other/dir'}; the longest matching prefix
 * wins) on [::] and a random port. Resolves with {url ('http://localhost:PORT'), port,
 * requests (every path asked for), close()}.
 */
export async function startStaticServer(mounts) {
  const prefixes = Object.keys(mounts).sort((a, b) => b.length - a.length);
  const requests = [];
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    requests.push(path);
    const prefix = prefixes.find((p) => path.startsWith(p));
    const root = prefix && mounts[prefix];
    const file = root && normalize(join(root, path.slice(prefix.length)));
    if (!file || !(file === root || file.startsWith(root.endsWith(sep) ? root : root + sep))) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '::', resolve));
  const { port } = server.address();
  return {
    url: `http://localhost:${port}`,
    port,
    requests,
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(resolve);
    }),
  };
}
