#!/usr/bin/env bash
# The main job on this machine: set up, bring the CPU monolith up through the launcher (etcd and
# nats-server started for it), ask the demo model a question through the client, show status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
launcher up topologies/cpu-monolith.yaml
echo "--- the OpenAI API (curl):"
curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "what is the capital of france?"}], "max_tokens": 24, "temperature": 0}'
echo
echo "--- the seed's client (NATS):"
python -m workers.common.client --prompt "what is the capital of france?" --max-tokens 24 --temperature 0 --chat
launcher status
echo
echo "The deployment keeps running. Stop it (worker, etcd, nats-server) with: .venv/bin/launcher down"
