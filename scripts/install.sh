#!/usr/bin/env bash
# Install bgplugin and everything it needs into the current Python, idempotently.
#
# torch is pinned to 2.13.0 only when no torch is installed: on the project's
# machines that version is a local CPU build, while an unpinned request would
# pull several GB of CUDA wheels. Users elsewhere may pre-install any torch >= 2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="${1:-}"
stamp=".install-stamp"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-${extras}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch missing: installing torch==2.13.0 (CPU build)"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import bgplugin" >/dev/null 2>&1; then
    exit 0
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "[install] pip install -e ${spec}"
"$PY" -m pip install --quiet --disable-pip-version-check -e "${spec}"
echo "$want" > "$stamp"
