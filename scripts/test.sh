#!/usr/bin/env bash
# Lint, type-check, then the tests in two tiers: the fast one (unit and fast integration: fakes, real
# etcd/NATS/tmux, no vLLM; a few minutes) and, only if it passes, the e2e one (real vLLM on CPU; tens of
# minutes). tests/conftest.py marks e2e every test that takes a model vLLM loads.
#   scripts/test.sh            both tiers
#   TIER=fast scripts/test.sh  the fast tier only
# Extra arguments go to both pytest runs (e.g. -x, -k NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check launcher workers tests bench scripts
mypy
pytest -ra -m "not e2e" "$@"
if [ "${TIER:-all}" != fast ]; then
  pytest -ra -m e2e "$@"
fi
