#!/usr/bin/env bash
# The test command of README.md (CI runs exactly this through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One ninja for every process: DeepSpeed rebuilds its CPU comm op whenever the ninja on PATH changes.
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
