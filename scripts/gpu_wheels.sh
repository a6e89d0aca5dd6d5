#!/usr/bin/env bash
# The wheels that bench/gpu_check.sh installs, offline, on a GPU machine that has Python 3.12 and a CUDA
# build of torch but no network: prepared here (where pip reaches PyPI) into .whl/ (git-ignored), one
# version of each package, the version this checkout's .venv has. torch is never among them: the check
# uses the machine's own.
#
#   bash scripts/gpu_wheels.sh           # what such a machine lacks: DeepSpeed and its requirements, the loader's
#                                        # (webdataset, simplejpeg...), about 10 MB
#   ALL=1 bash scripts/gpu_wheels.sh     # also the large ones a machine with torch usually has (numpy, pyarrow,
#                                        # pillow, transformers, tokenizers...), about 110 MB
#
# deepspeed and python-hostlist publish only source distributions: they are built into wheels here
# (`pip wheel --no-deps`, DeepSpeed with DS_BUILD_OPS=0: pure Python, its ops compile on first use);
# everything else is downloaded as the wheel for CPython 3.12 on manylinux x86_64
# (PY_VERSION, PLATFORMS to change that). The wheels replace what .whl/ held before.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux2014_x86_64}
# every distribution the check imports, less torch and torch's own requirements (filelock, jinja2, sympy...)
BUILT="deepspeed python-hostlist"
SMALL="einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core annotated-types
       typing-inspection typing-extensions tqdm webdataset braceexpand simplejpeg pyyaml safetensors
       prometheus-client"
LARGE="numpy pillow pyarrow transformers tokenizers huggingface-hub hf-xet regex httpx2 httpcore2 h11 anyio
       idna truststore click typer shellingham rich markdown-it-py mdurl pygments kernels"
NAMES="$SMALL"
[[ "${ALL:-0}" != 0 ]] && NAMES="$SMALL $LARGE"

version() {  # the version installed in this checkout's environment
    "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/relalign-wheels.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
for name in $BUILT; do
    # the build imports torch (DeepSpeed's setup.py): the checkout's environment builds it, no isolation
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary=:all: -w "$STAGE" \
        "$name==$(version "$name")"
done
platform_args=()
for platform in $PLATFORMS; do platform_args+=(--platform "$platform"); done
pins=()
for name in $NAMES; do
    if pin=$(version "$name" 2>/dev/null); then
        pins+=("$name==$pin")
    else
        echo "gpu_wheels: $name is not installed in $PY's environment: skipped" >&2
    fi
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
    "${platform_args[@]}" -d "$STAGE" "${pins[@]}"
if ls "$STAGE" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
    echo "gpu_wheels: a torch wheel got in; refusing to write $DEST" >&2
    exit 1
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mv "$STAGE"/*.whl "$DEST"/
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sm "$DEST" | cut -f1) MB in $DEST for CPython $PY_VERSION"
