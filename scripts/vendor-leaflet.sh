#!/usr/bin/env bash
# Copies Leaflet from node_modules (the version pinned in package.json / package-lock.json,
# installed by `npm ci`) into web-demo/vendor/leaflet-VERSION/, so the map page works offline
# and without a build step. tests/js/package.test.mjs checks the copy is byte for byte the
# pinned release. To upgrade: npm install --save-dev --save-exact leaflet@NEW, run this script,
# remove the old directory and update the version in web-demo/map.html.
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(node -p 'require("./node_modules/leaflet/package.json").version')"
dest="web-demo/vendor/leaflet-$version"
rm -rf "$dest"
mkdir -p "$dest/images"
cp node_modules/leaflet/dist/leaflet.js node_modules/leaflet/dist/leaflet.css "$dest/"
cp node_modules/leaflet/dist/images/*.png "$dest/images/"
cp node_modules/leaflet/LICENSE "$dest/LICENSE"
echo "vendored Leaflet $version into $dest"
