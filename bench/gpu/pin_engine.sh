#!/usr/bin/env bash
# Runs a command with vLLM's engine processes on whole physical cores of their own and everything else (client,
# frontend processes, nats-server, etcd) on the remaining CPUs: an experiment for issue 19, to see whether the
# frontend side's lower tokens/s at C=64 comes from its processes sharing physical cores (hyperthread siblings)
# with the engine's CPU-bound step loop. Every side of bench_compare.py runs pinned alike.
#
#   bash bench/gpu/pin_engine.sh [ENGINE_CORES] -- bash bench/gpu/run_gpu.sh bench ...
#
# ENGINE_CORES (default 2) physical cores, with all their hyperthread siblings, go to the monolith worker and its
# EngineCore; a loop re-pins them (all threads, `taskset -a`) every second, since both start after the command.
set -u
engine_cores=2
if [ "${1:-}" != "--" ]; then engine_cores=$1; shift; fi
[ "${1:-}" = "--" ] && shift

declare -A seen=()
engine=()
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do
    [ -f "$cpu/topology/thread_siblings_list" ] || continue
    siblings=$(cat "$cpu/topology/thread_siblings_list")
    [ -n "${seen[$siblings]:-}" ] && continue
    seen[$siblings]=1
    [ "${#seen[@]}" -le "$engine_cores" ] && engine+=("$siblings")
done
engine_list=$(IFS=,; echo "${engine[*]}")
all=$(python3 - "$engine_list" <<'EOF'
import os, sys
def parse(s):
    out = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out
engine = parse(sys.argv[1])
print(",".join(str(c) for c in sorted(os.sched_getaffinity(0) - engine)))
EOF
)
echo "[pin] engine (monolith worker + EngineCore): $engine_list; everything else: $all"
lscpu | grep -E "^(Model name|Thread|Core|Socket)" || true

taskset -cp "$all" $$ >/dev/null
(
    while sleep 1; do
        for pid in $(pgrep -f "VLLM::EngineCore|workers\.monolith\.worker"); do
            taskset -a -cp "$engine_list" "$pid" >/dev/null 2>&1
        done
    done
) &
pinner=$!
"$@"
rc=$?
kill "$pinner" 2>/dev/null
for pid in $(pgrep -f "VLLM::EngineCore|workers\.monolith\.worker"); do
    echo "[pin] still running: $pid $(taskset -cp "$pid")"
done
exit $rc
