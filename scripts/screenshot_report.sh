#!/usr/bin/env bash
# Screenshot an HTML report (or any local HTML file) with headless Chromium.
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Needs Debian's `chromium` package (apt-get install -y chromium). Offline flags: no network
# services, no GPU, a throw-away profile. Example, from a fresh run:
#
#   medeyes rollout --n 4 --out runs/demo
#   medeyes inspect runs/demo --html runs/demo/report.html
#   scripts/screenshot_report.sh runs/demo/report.html docs/inspect_report.png
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
report="$(realpath "$1")"
out="$(realpath -m "$2")"
size="${3:-1280,2000}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
    echo "chromium not found; install it with: apt-get install -y chromium" >&2
    exit 3
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --window-size="$size" \
    --screenshot="$out" "file://$report" >/dev/null 2>&1
test -s "$out"
echo "$out"
