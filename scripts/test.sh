#!/usr/bin/env bash
# Lint, type-check and run every test (unit and end-to-end on real vLLM, etcd, NATS, tmux).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check launcher workers tests bench scripts
mypy
pytest -ra "$@"
