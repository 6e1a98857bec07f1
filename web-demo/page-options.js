// page-options.js: the connect() options the demo pages take from their own address, so a
// page can be pointed elsewhere without editing it:
//
//   ?server=URL[,URL...]   the fleetcast node(s) to use (default: the page's own origin)
//   ?transport=T          auto | webtransport (no fallback) | websocket
//   ?token=JWT            subscriber token, for a server started with --subscribe-secret
//
// connect() checks the values and throws a TypeError naming a bad one.

/** connect() options from a query string such as location.search. */
export function pageOptions(search) {
  const params = new URLSearchParams(search);
  const options = {};
  const server = params.get('server');
  if (server !== null) options.server = server.split(',').map((s) => s.trim()).filter(Boolean);
  const transport = params.get('transport');
  if (transport !== null) options.transport = transport;
  const token = params.get('token');
  if (token) options.token = token;
  return options;
}
