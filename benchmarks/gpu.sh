#!/usr/bin/env bash
# The GPU measurements in one command (benchmarks/README.md, "GPU pack").
#
#   benchmarks/gpu.sh                 # all steps on the GPU: check tests scoring latency decode
#   benchmarks/gpu.sh decode          # one step (or several, in the order given)
#   benchmarks/gpu.sh --dry-run       # the same steps on a CPU with a tiny random model (logic check)
#
# Results: benchmarks/results/gpu_*.json and the log benchmarks/results/gpu_run.log (--dry-run:
# a fresh /tmp/gpu-dry-* folder, so dry numbers never sit beside GPU ones; GPU_OUT=DIR overrides).
# Without a CUDA GPU every step but --dry-run stops at once with a message and exit status 3.
# A failing step does not stop the next ones; the exit status is then 1 and the summary says which.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL=(check tests scoring latency decode)
DRY=0
STEPS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    check|tests|scoring|latency|decode) STEPS+=("$arg") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg'; steps: ${ALL[*]}, or --dry-run" >&2; exit 2 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")

PY=${PYTHON:-python}
export PYTHONPATH="$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  OUT=${GPU_OUT:-$(mktemp -d /tmp/gpu-dry-XXXXXX)}
  LOG="$OUT/gpu_dry_run.log"
else
  OUT=${GPU_OUT:-benchmarks/results}
  LOG="$OUT/gpu_run.log"
fi
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1
echo "== gpu.sh $(date -u +%FT%TZ) steps: ${STEPS[*]} dry_run=$DRY out=$OUT"

check() {
  "$PY" - "$DRY" <<'EOF'
import sys, platform, torch
dry = sys.argv[1] == "1"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda})")
if not torch.cuda.is_available():
    if dry:
        print("no CUDA GPU: dry run on the CPU")
        sys.exit(0)
    print("gpu.sh: no CUDA GPU is visible (torch.cuda.is_available() is False). Run this on a GPU machine "
          "with a CUDA build of torch (benchmarks/README.md, 'GPU pack': the wheels to bring), "
          "or use `benchmarks/gpu.sh --dry-run` to check the scripts on a CPU.", file=sys.stderr)
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
try:
    import gptqmodel
    print(f"gptqmodel {gptqmodel.__version__}")
except ImportError as e:
    print(f"gptqmodel missing ({e}): the decode step will fail", file=sys.stderr)
EOF
}

tests() { "$PY" -m pytest -m gpu -q -rs tests; }

scoring() {
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/scoring.py --random-7b --shape tiny --device cpu --samples 4 --seq-len 64 --repeats 1 --out "$OUT"
  else
    "$PY" benchmarks/scoring.py --random-7b --device cuda --samples 32 --seq-len 2048 --out "$OUT"
  fi
}

latency() {
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/latency.py --random-7b --shape tiny --device cpu --prompt-tokens 16 --new-tokens 4 --repeats 1 --out "$OUT"
  else
    "$PY" benchmarks/latency.py --random-7b --device cuda --out "$OUT"
  fi
}

decode() {
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/gpu_decode.py --device cpu --shape tiny --prompt-tokens 16 --new-tokens 4 --repeats 1 --out "$OUT"
  else
    "$PY" benchmarks/gpu_decode.py --device cuda --out "$OUT"
  fi
}

echo "== check"
check || exit 3  # every step needs the GPU (or --dry-run): stop here, clearly
SUMMARY=()
FAILED=0
for step in "${STEPS[@]}"; do
  [ "$step" = check ] && continue
  echo "== $step"
  start=$SECONDS
  "$step"
  rc=$?
  SUMMARY+=("$step: exit $rc, $((SECONDS - start)) s")
  [ $rc -ne 0 ] && FAILED=1
done
echo "== summary (results and this log in $OUT)"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
