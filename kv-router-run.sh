#!/usr/bin/env bash
# The seed's helper, now a thin wrapper over `launcher up`: N KV-aware vLLM workers behind one
# KV router, each in its own tmux session (`tmux a -t v-1` ... `tmux a -t v-N`, `tmux a -t v-router`).
#
#   ./kv-router-run.sh N STRATEGY [MODEL] [launcher up options...]
#     N          number of kv workers (processes v-1 .. v-N)
#     STRATEGY   prefix | round_robin | random
#     MODEL      a model folder or hub id (default: models/SmolLM2-135M-Instruct, the demo model)
#
# It writes the topology it runs (so `launcher plan` / `validate` can show it) and starts it:
# one GPU per worker when the host has at least N GPUs, otherwise the CPU build's settings.
# Environment: KV_ROUTER_NAME (deployment name, default kv-router-run), LAUNCHER_HOME,
# LAUNCHER_TMUX_SOCKET (a private tmux server instead of the default one), ETCD_ENDPOINTS, NATS_SERVER,
# KV_ROUTER_METRICS_PORT_BASE (first metrics port, default 9400), KV_ROUTER_PLAN=1 (print the plan, start nothing).
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 2 ] || usage
n=$1
strategy=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
model="$here/models/SmolLM2-135M-Instruct"
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
  model=$1
  shift
fi

case $n in
  '' | *[!0-9]* | 0) echo "N must be a positive number of workers, got '$n'" >&2; exit 2 ;;
esac
case $strategy in
  prefix | round_robin | random) ;;
  *) echo "STRATEGY must be prefix, round_robin or random, got '$strategy'" >&2; exit 2 ;;
esac
# A folder is given to the launcher as an absolute path; anything else is a hub id.
if [ -d "$model" ]; then
  model=$(cd "$model" && pwd)
fi

name=${KV_ROUTER_NAME:-kv-router-run}
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
state=${LAUNCHER_HOME:-$HOME/.local/state/vllm-launcher}
mkdir -p "$state"
topology="$state/$name.yaml"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

# JSON-quote a string (model ids and paths may hold anything YAML would misread).
q() { "$python" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

{
  echo "# written by kv-router-run.sh $n $strategy: N kv workers behind one KV router"
  echo "name: $(q "$name")"
  echo "backend: tmux"
  echo "model: $(q "$model")"
  if [ -n "${KV_ROUTER_METRICS_PORT_BASE:-}" ]; then
    echo "metrics_port_base: $KV_ROUTER_METRICS_PORT_BASE"
  fi
  if [ "$gpus" -ge "$n" ]; then
    echo "engine: {max-model-len: 16384, block-size: 64, enable-prefix-caching: true}"
  else
    # vLLM 0.32 CPU attention wants block sizes that are multiples of 32 (16 fails at engine start)
    echo "engine: {max-model-len: 2048, block-size: 32, enable-prefix-caching: true, enforce-eager: true}"
    echo "env: {VLLM_CPU_KVCACHE_SPACE: \"1\"}"
  fi
  echo "workers:"
  echo "  - name: v"
  echo "    kind: kv_worker"
  echo "    replicas: $n"
  if [ "$gpus" -ge "$n" ]; then
    echo "    gpus: [$(seq -s ', ' 0 $((n - 1)))]"
    echo "    gpus_per_replica: 1"
  fi
  echo "    ready_timeout: 1800"
  echo "routers:"
  echo "  - name: v-router"
  echo "    strategy: $strategy"
} >"$topology"

echo "topology: $topology"
if [ "${KV_ROUTER_PLAN:-}" = 1 ]; then
  cd "$here" && exec "$python" -m launcher.cli plan "$topology"
fi
status=0
(cd "$here" && "$python" -m launcher.cli up "$topology" "$@") || status=$?

socket=${LAUNCHER_TMUX_SOCKET:+-L $LAUNCHER_TMUX_SOCKET }
cat <<EOF

watch a worker:   tmux ${socket}a -t v-1        (v-1 .. v-$n, router: tmux ${socket}a -t v-router)
                  or: launcher attach v-1
status:           launcher status $name
send a request:   eval "\$(launcher credentials env $name)" && python -m workers.common.client --namespace $name --component preprocess --prompt 'what is the capital of france?' --chat
close:            launcher down $name
EOF
exit "$status"
