#!/usr/bin/env bash
# Run the vllm-launcher image: all GPUs, a large /dev/shm (NCCL and vLLM's TP workers need it),
# host network (etcd, NATS, NIXL and the other hosts must reach this one), an init as PID 1, the repository mounted
# over the image's copy (edit here, run there) and the Hugging Face cache mounted (weights once per host).
#
#   container/run.sh --framework VLLM [-it] [--image IMAGE] [--gpus all|none|DEVICES] [--shm-size 10G]
#                    [--hf-cache DIR] [--no-mount-workspace] [--dry-run] [DOCKER RUN ARGS] [-- COMMAND ...]
#
# Options it does not know go to `docker run`; what follows `--` runs in the container (default:
# the launcher's help, or bash with -it). Without docker on the PATH (or with --dry-run) it prints
# the exact `docker run` it would run.
set -euo pipefail

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "$0"
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
FRAMEWORK="VLLM"
IMAGE=""
GPUS="all"
SHM_SIZE="10G"
HF_CACHE="${HF_HOME:-$HOME/.cache/huggingface}"
MOUNT_WORKSPACE=1
INTERACTIVE=0
DRY_RUN=0
DOCKER_ARGS=()
COMMAND=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --framework) FRAMEWORK="${2:?--framework needs a value (VLLM)}"; shift 2 ;;
        --framework=*) FRAMEWORK="${1#*=}"; shift ;;
        --image) IMAGE="${2:?--image needs an image name}"; shift 2 ;;
        --gpus) GPUS="${2:?--gpus needs all, none or a device list}"; shift 2 ;;
        --shm-size) SHM_SIZE="${2:?--shm-size needs a size like 10G}"; shift 2 ;;
        --hf-cache) HF_CACHE="${2:?--hf-cache needs a folder}"; shift 2 ;;
        --no-mount-workspace) MOUNT_WORKSPACE=0; shift ;;
        -it) INTERACTIVE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; COMMAND+=("$@"); break ;;
        *) DOCKER_ARGS+=("$1"); shift ;;
    esac
done

case "${FRAMEWORK^^}" in
    VLLM) FRAMEWORK=vllm ;;
    *)
        echo "error: unknown framework '$FRAMEWORK': this project runs on vLLM only; use --framework VLLM" >&2
        exit 2 ;;
esac

IMAGE="${IMAGE:-vllm-launcher:$FRAMEWORK}"
WORKDIR=/workspace/vllm-launcher
CMD=(docker run --rm)
if [[ "$GPUS" != "none" ]]; then
    CMD+=(--gpus "$GPUS")
fi
# --init: a small init as PID 1 forwards `docker stop`'s SIGTERM to the command and reaps the processes that
# outlive their parents (a launcher's services and EngineCores), which a bare PID 1 leaves as zombies.
CMD+=(--init --shm-size "$SHM_SIZE" --ulimit memlock=-1 --ulimit stack=67108864 --network host)
if [[ $MOUNT_WORKSPACE -eq 1 ]]; then
    CMD+=(-v "$ROOT:$WORKDIR")
fi
CMD+=(-v "$HF_CACHE:/root/.cache/huggingface" -w "$WORKDIR")
# Passed by name only: the value comes from this shell's environment and is never printed.
CMD+=(-e HF_TOKEN -e ETCD_ENDPOINTS -e NATS_SERVER)
if [[ $INTERACTIVE -eq 1 ]]; then
    CMD+=(-it)
    if [[ ${#COMMAND[@]} -eq 0 ]]; then
        COMMAND=(bash)
    fi
fi
CMD+=("${DOCKER_ARGS[@]}" "$IMAGE" "${COMMAND[@]}")

if [[ $DRY_RUN -eq 1 ]] || ! command -v docker > /dev/null 2>&1; then
    [[ $DRY_RUN -eq 1 ]] || echo "docker is not installed: this is the command that would run" >&2
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
if [[ $INTERACTIVE -eq 0 ]] || [[ ! -d "$HF_CACHE" ]]; then
    mkdir -p "$HF_CACHE"
fi
exec "${CMD[@]}"
