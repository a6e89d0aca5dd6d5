#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# torch==2.13.0 (the CPU build) goes in first; every later install is constrained by constraints.txt
# so that nothing ever replaces it with a CUDA build. Re-runs are no-ops unless the requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RELALIGN_VENV:-.venv}
stamp="$VENV/.relalign-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
"$VENV/bin/python" -c 'import torch, deepspeed, webdataset; assert torch.__version__.startswith("2.13.0"), torch.__version__' 2>/dev/null
echo "$want" > "$stamp"
