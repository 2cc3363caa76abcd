#!/usr/bin/env bash
# The main job on this machine: set up, bring the CPU monolith up through the launcher (etcd and
# nats-server started for it), ask the demo model a question through the client, show status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
launcher up topologies/cpu-monolith.yaml
python -m workers.common.client --prompt "what is the capital of france?" --max-tokens 24 --temperature 0 --chat
launcher status
echo
echo "The deployment keeps running. Stop it (worker, etcd, nats-server) with: .venv/bin/launcher down"
