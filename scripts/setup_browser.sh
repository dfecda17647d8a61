#!/usr/bin/env bash
# Provision the real-browser test (tests/browser/): Debian's Chromium and npm's playwright-core.
# Safe to re-run: when both are there already it does nothing and takes well under a second.
#
#   Chromium       apt-get install chromium            -> /usr/bin/chromium (or $CHROMIUM_PATH)
#   playwright-core npm install playwright-core@PINNED -> .comfyui/node/node_modules (ignored by git)
#
# Playwright never downloads a browser here: the test launches the system Chromium with
# executablePath. Exit status: 0 ready; 3 Chromium (or a Node.js >= 20 to drive it) cannot be
# installed on this machine -- the reason is written to .comfyui/browser.unavailable and the browser
# test is then skipped with it; anything else is a real failure (e.g. npm could not install).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.comfyui"
NODE_DIR="$STATE/node"
UNAVAILABLE="$STATE/browser.unavailable"
PW_VERSION="1.65.1"
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"

say() { echo "setup_browser: $*"; }
unavailable() {  # the one case in which the browser test may be skipped
  echo "$*" > "$UNAVAILABLE"
  echo "setup_browser: UNAVAILABLE: $*" >&2
  exit 3
}

mkdir -p "$STATE"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else return 126
  fi
}

apt_install() {  # $@ = Debian packages
  command -v apt-get >/dev/null || return 127
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q --no-install-recommends "$@" && return 0
  # The package lists may be missing or stale on a fresh machine: refresh once and retry.
  as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "$@"
}

# -- Chromium ----------------------------------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
  [ -z "${CHROMIUM_PATH:-}" ] || unavailable "CHROMIUM_PATH=$CHROMIUM_PATH is not an executable."
  say "installing Debian's chromium (apt-get)"
  if ! apt_install chromium fonts-liberation; then
    unavailable "Chromium is not installed and 'apt-get install chromium' failed or is not possible here (needs Debian/Ubuntu apt and root or passwordless sudo)."
  fi
  [ -x "$CHROMIUM" ] || unavailable "apt-get installed chromium but $CHROMIUM does not exist."
fi
"$CHROMIUM" --version >/dev/null 2>&1 || unavailable "$CHROMIUM does not run ('$CHROMIUM --version' failed)."

# -- Node.js (drives Chromium through playwright-core) -----------------------------------------
node_ok() { command -v node >/dev/null && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)'; }
node_ok || unavailable "Node.js >= 20 is needed to drive Chromium with playwright-core@$PW_VERSION; found: $(node --version 2>/dev/null || echo none)."
command -v npm >/dev/null || unavailable "npm is not installed (needed once to install playwright-core)."

# -- playwright-core, pinned, in an ignored folder ---------------------------------------------
installed_pw() { node -e 'try{console.log(require(process.argv[1]).version)}catch(e){}' \
  "$NODE_DIR/node_modules/playwright-core/package.json" 2>/dev/null || true; }
if [ "$(installed_pw)" != "$PW_VERSION" ]; then
  say "installing playwright-core@$PW_VERSION into ${NODE_DIR#"$ROOT"/} (npm; no browser download)"
  mkdir -p "$NODE_DIR"
  [ -f "$NODE_DIR/package.json" ] || echo '{"private": true, "name": "sdxl-lora-trainer-browser-test"}' > "$NODE_DIR/package.json"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
    --save-exact "playwright-core@$PW_VERSION" || { echo "setup_browser: ERROR: npm could not install playwright-core@$PW_VERSION." >&2; exit 1; }
  [ "$(installed_pw)" = "$PW_VERSION" ] || { echo "setup_browser: ERROR: playwright-core@$PW_VERSION missing after npm install." >&2; exit 1; }
fi

rm -f "$UNAVAILABLE"
say "ready: $("$CHROMIUM" --version 2>/dev/null | head -1), playwright-core $PW_VERSION"
