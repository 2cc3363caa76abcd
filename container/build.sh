#!/usr/bin/env bash
# Build the vllm-launcher image on vLLM's own GPU image (vllm/vllm-openai).
#
#   container/build.sh --framework VLLM [--tag IMAGE] [--base-tag vX.Y.Z] [--dry-run] [-- EXTRA DOCKER BUILD ARGS]
#
# Without docker on the PATH (or with --dry-run) it prints the exact `docker build` it would run.
set -euo pipefail

usage() {
    sed -n '2,7s/^# \{0,1\}//p' "$0"
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
FRAMEWORK="VLLM"
TAG=""
BASE_TAG=""
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --framework) FRAMEWORK="${2:?--framework needs a value (VLLM)}"; shift 2 ;;
        --framework=*) FRAMEWORK="${1#*=}"; shift ;;
        --tag) TAG="${2:?--tag needs an image name}"; shift 2 ;;
        --base-tag) BASE_TAG="${2:?--base-tag needs a tag of vllm/vllm-openai}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

case "${FRAMEWORK^^}" in
    VLLM) FRAMEWORK=vllm ;;
    *)
        echo "error: unknown framework '$FRAMEWORK': this project builds on vLLM only; use --framework VLLM" >&2
        exit 2 ;;
esac

TAG="${TAG:-vllm-launcher:$FRAMEWORK}"
CMD=(docker build -f "$HERE/Dockerfile" -t "$TAG")
if [[ -n "$BASE_TAG" ]]; then
    CMD+=(--build-arg "VLLM_TAG=$BASE_TAG")
fi
CMD+=("${EXTRA[@]}" "$ROOT")

if [[ $DRY_RUN -eq 1 ]] || ! command -v docker > /dev/null 2>&1; then
    [[ $DRY_RUN -eq 1 ]] || echo "docker is not installed: this is the command that would run" >&2
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
exec "${CMD[@]}"
