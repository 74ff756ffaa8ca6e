#!/bin/sh
# Unpack Debian's `prometheus` package (prometheus + promtool binaries) into DEST without installing it:
# no service, no root needed once the package index is present. Idempotent: does nothing when
# DEST/usr/bin/promtool already exists. The tests look for the binaries in .venv/prometheus/usr/bin
# (tests/prometheus_server.py: prometheus_binaries()).
#
#   tools/fetch_prometheus.sh [DEST]        # default DEST: .venv/prometheus
set -eu

DEST=${1:-.venv/prometheus}
if [ -x "$DEST/usr/bin/promtool" ] && [ -x "$DEST/usr/bin/prometheus" ]; then
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "fetch_prometheus: needs Debian's apt-get and dpkg-deb" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT INT TERM

download() {
    (cd "$WORK" && apt-get download -qq prometheus >/dev/null 2>&1)
}

if ! download; then
    # A fresh machine (or container image) often has an empty or stale package index.
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n apt-get update -qq >/dev/null
    else
        echo "fetch_prometheus: 'apt-get download prometheus' failed and apt-get update needs root" >&2
        exit 1
    fi
    download || { echo "fetch_prometheus: 'apt-get download prometheus' failed" >&2; exit 1; }
fi

DEB=$(ls "$WORK"/prometheus_*.deb)
mkdir -p "$DEST"
dpkg-deb -x "$DEB" "$DEST"
"$DEST/usr/bin/promtool" --version >/dev/null
echo "fetch_prometheus: $(basename "$DEB") unpacked into $DEST"
