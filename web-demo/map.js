// map.js: the fleet on a real map. Leaflet (vendored, web-demo/vendor/) draws an optional tile
// layer, the road network from the server as a GeoJSON layer and one marker per car, which
// glides between fixes (motion.js) and opens its details on click or Enter. fleetcast-client.js
// does all the connecting. State for people and tests: window.fleetcast (docs/web-demo.md).
//
// The page's address may say ?server=, ?transport=, ?token= (page-options.js), and ?tiles= and
// ?attribution= for a base map (default: the <meta name="fleetcast-tiles"> in map.html, empty).

import { connect } from './fleetcast-client.js';
import { pageOptions } from './page-options.js';
import { followCars, horizonS, localProjection } from './motion.js';
import { fetchRoads, roadsToGeoJSON } from './roads.js';
import { kmh, headingText, fixAgeText, carColour } from './car-format.js';

const L = window.L;
/** Marker size, CSS pixels. */
const ICON_PX = 18;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content.trim() || null;
const tiles = params.get('tiles') ?? meta('fleetcast-tiles');
const attribution = params.get('attribution') ?? meta('fleetcast-attribution') ?? '';

function notice(text) {
  $('notice').hidden = !text;
  $('notice').textContent = text ?? '';
}

let fleet;
try {
  fleet = connect(pageOptions(location.search));
} catch (e) {
  notice(e.message); // a bad ?server= or ?transport=
  throw e;
}

const map = L.map('map', { zoomSnap: 0.25 }).setView([52.37, 4.89], 13);
if (tiles) L.tileLayer(tiles, { attribution, maxZoom: 19 }).addTo(map);

// ---- Cars --------------------------------------------------------------------------------

/** id -> {car, marker, glide} */
const markers = new Map();
let projection = null;
let fitted = false;
let roadCount = 0;
let fetchingRoads = false;

const nowS = () => performance.now() / 1000;

function carIcon() {
  return L.divIcon({
    className: 'car-icon',
    html: '<div class="arrow"></div>',
    iconSize: [ICON_PX, ICON_PX],
  });
}

/** The popup's content: the car's details, the time since its fix counting on. */
function details(car) {
  const rows = [
    ['id', String(car.id)],
    ['speed', kmh(car.speedMps)],
    ['heading', headingText(car.headingDeg)],
    ['position', `${car.lat.toFixed(5)}, ${car.lon.toFixed(5)}`],
    ['fix taken', fixAgeText(car, Date.now())],
    ['tick', String(car.tick)],
  ];
  const box = document.createElement('div');
  box.className = 'car-popup';
  const h = document.createElement('h2');
  h.textContent = car.label;
  const dl = document.createElement('dl');
  for (const [k, v] of rows) dl.append(Object.assign(document.createElement('dt'), { textContent: k }),
    Object.assign(document.createElement('dd'), { textContent: v }));
  box.append(h, dl);
  return box;
}

/** Paints a marker's arrow: its heading and its speed's colour. */
function paint(entry) {
  const arrow = entry.marker.getElement()?.firstElementChild;
  if (!arrow) return;
  arrow.style.setProperty('--hdg', `${entry.car.headingDeg}deg`);
  arrow.style.setProperty('--colour', carColour(entry.car.speedMps));
}

function onTick(cars) {
  const area = fleet.area;
  if (!area) return;
  if (!projection) projection = localProjection(area.south, area.west);
  if (!fitted) {
    fitted = true;
    map.fitBounds([[area.south, area.west], [area.north, area.east]], { padding: [12, 12] });
  }
  followCars(markers, cars, projection, nowS(), horizonS(fleet.tickIntervalMs), {
    create: (car, glide) => {
      const marker = L.marker([car.lat, car.lon], {
        icon: carIcon(), keyboard: true, title: car.label, alt: car.label, riseOnHover: true,
      });
      const entry = { car, marker, glide };
      marker.bindPopup(() => details(entry.car), { autoPan: false });
      marker.addTo(map);
      return entry;
    },
    removed: (entry) => entry.marker.remove(),
  });
  for (const entry of markers.values()) {
    paint(entry);
    if (entry.marker.isPopupOpen()) entry.marker.setPopupContent(details(entry.car));
  }
  $('count').textContent = `${markers.size} cars`;
  if (!fetchingRoads) {
    fetchingRoads = true;
    fetchRoads(fleet.server).then((roads) => {
      const geo = roadsToGeoJSON(roads);
      roadCount = geo.features.length;
      L.geoJSON(geo, {
        interactive: false,
        style: (f) => ({ className: 'road', color: f.properties.major ? '#6e7c8c' : '#4a5664', weight: f.properties.major ? 4 : 2, opacity: 0.9 }),
      }).addTo(map).bringToBack();
    });
  }
}

/** Moves every marker to where its glide puts it now; keeps an open popup's age current. */
let lastPopup = 0;
function frame() {
  if (projection) {
    const t = nowS();
    for (const entry of markers.values()) {
      const p = entry.glide.at(t);
      entry.marker.setLatLng(projection.toLatLon(p.e, p.n));
    }
    if (t - lastPopup > 0.25) {
      lastPopup = t;
      for (const entry of markers.values()) if (entry.marker.isPopupOpen()) entry.marker.setPopupContent(details(entry.car));
    }
  }
  requestAnimationFrame(frame);
}

// ---- State -------------------------------------------------------------------------------

const STATE_TEXT = {
  connecting: 'connecting…',
  live: 'live',
  stale: 'stale · no recent data',
  reconnecting: 'reconnecting',
  paused: 'paused (page hidden)',
  offline: 'offline',
};

fleet.addEventListener('tick', (e) => onTick(e.detail.cars));
fleet.addEventListener('state', (e) => {
  const d = e.detail;
  const pill = $('conn');
  pill.dataset.state = d.state;
  pill.textContent = d.state === 'live' ? `live · ${d.transport === 'webtransport' ? 'WebTransport' : 'WebSocket'}` : STATE_TEXT[d.state];
  map.getContainer().classList.toggle('stale', d.state !== 'live');
  const s = fleet.stats;
  if (s.unsupportedVersion) notice(`This page cannot read this server: ${s.unsupportedVersion}. Reload the page.`);
  else if (s.token === 'refused') notice('The server refused the session: a subscriber token (?token=) may be missing, invalid or expired.');
  else if (d.state === 'live') notice(s.fallbackReason && d.transport === 'websocket' ? `WebSocket fallback: ${s.fallbackReason}` : null);
  else if (d.state === 'reconnecting' && s.lastError) notice(`Connection lost: ${s.lastError}`);
});

/** Live state for people and tests. */
window.fleetcast = {
  get transport() { return fleet.transport; },
  get connected() { return fleet.transport !== null; },
  get state() { return fleet.state; },
  get server() { return fleet.server; },
  get cars() { return markers.size; },
  get ticksReceived() { return fleet.stats.ticksReceived; },
  get sessions() { return fleet.stats.sessions; },
  get fallbackReason() { return fleet.stats.fallbackReason; },
  get roads() { return roadCount; },
  tiles,
  /** Every marker: its car, where the marker is now and its pixel position in the map. */
  carList: () => [...markers.values()].map(({ car, marker }) => {
    const at = marker.getLatLng();
    const p = map.latLngToContainerPoint(at);
    return { ...car, markerLat: at.lat, markerLon: at.lng, point: [p.x, p.y] };
  }),
  /** The Leaflet map, for people poking at the page. */
  map,
};

requestAnimationFrame(frame);
