#!/usr/bin/env bash
# Issue 7's GPU runs, after bench/gpu/install.sh has installed everything (same warm machine).
#
#   bash bench/gpu/run_gpu.sh run1          # 1 GPU: monolith up/ask/status/down + NATS vs in-process bench
#   bash bench/gpu/run_gpu.sh run2          # 2 GPUs: 1P1D over NixlConnector, then the KV router
#   bash bench/gpu/run_gpu.sh run2 --parts router      # only the router half (or --parts 1p1d)
#   bash bench/gpu/run_gpu.sh check         # only: environment, imports, GPUs (seconds)
#   bash bench/gpu/run_gpu.sh model         # only: check + make the model
#   bash bench/gpu/run_gpu.sh bench [--reps 4 --budget-s 420 ...]   # issue 13: bench_compare.py on GPU 0
#
# Results: PASS/FAIL/INFO lines on stdout, and $OUT/<run>.json, $OUT/bench-*.json, $OUT/logs/ (the device
# tool returns what is under $OUT). Extra arguments go to gpu_runs.py (--requests, --concurrency, ...).
# GPU_MODEL=tiny uses scripts/make_models.py's tiny Llama instead of the ~150M 'small' one.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENV_FILE=${GPU_ENV:-/root/gpu-env.sh}
OUT=${OUT:-/tmp/gpu-out}
export OUT
mkdir -p "$OUT"
cd "$REPO"

if [ -f "$ENV_FILE" ]; then
    # shellcheck source=/dev/null
    . "$ENV_FILE"
elif "${GPU_PY:=python3}" -c "import vllm" 2>/dev/null; then
    # A machine with network: vLLM was pip-installed normally (README.md, "with network").
    GPU_PY=$(command -v "$GPU_PY")
    export GPU_PY GPU_INSTALL_MODE=system
else
    echo "FAIL setup: no $ENV_FILE and $GPU_PY cannot import vllm: run bench/gpu/install.sh with every bundle first"
    exit 1
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
if [ "${GPU_INSTALL_MODE:-}" = venv ]; then
    # Workers are started as `sys.executable -m workers...`: make the repo importable for them too.
    site=$("$GPU_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$REPO" > "$site/vllm_launcher_repo.pth"
fi

run=${1:-check}
shift || true

{
    echo "== $(date -u +%FT%TZ) run_gpu.sh $run $*"
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader || echo "FAIL nvidia-smi"
    "$GPU_PY" -c 'import torch, vllm; print(f"torch {torch.__version__} vllm {vllm.__version__} gpus {torch.cuda.device_count()}")'
} 2>&1 | tee -a "$OUT/run_gpu.log"

if [ "$run" = check ]; then
    exit 0
fi

case "${GPU_MODEL:-small}" in
    tiny) model_size=tiny ;;
    *) model_size=small ;;
esac
# The topologies point at models/gpu-llama; a tiny model goes there too when asked for.
model_dir="$REPO/models/gpu-llama"
stamp="$model_dir/.size-$model_size"
if [ -d "$model_dir" ] && [ ! -f "$stamp" ]; then
    rm -rf "$model_dir"
fi
"$GPU_PY" bench/gpu/make_gpu_model.py "$model_size" "$model_dir" 2>&1 | tail -2
touch "$stamp"
if [ "$run" = model ]; then
    exit 0  # only the model (a command of its own, so that the next one has all its minutes)
fi

set +e
if [ "$run" = bench ]; then
    # Issue 13: in-process vs worker + NATS (+ the plane before) vs vllm serve: one engine each on GPU 0.
    "$GPU_PY" bench/gpu/bench_compare.py --model "$model_dir" --gpus 0 \
        --engine '{"max-model-len": 4096, "gpu-memory-utilization": 0.2, "max-num-batched-tokens": 8192, "max-num-seqs": 1024}' --out "$OUT/bench" "$@" \
        2>&1 | tee -a "$OUT/run_gpu.log"
else
    "$GPU_PY" bench/gpu/gpu_runs.py "$run" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/run_gpu.log"
fi
rc=${PIPESTATUS[0]}
set -e
echo "== run_gpu.sh $run exit $rc" | tee -a "$OUT/run_gpu.log"
exit "$rc"
