"""The OpenAI frontend on real vLLM (CPU), etcd and NATS, driven by clients nobody here wrote: the
official `openai` SDK, curl and `vllm bench serve`, against a monolith, a 1P1D and a KV-router topology.

What a user checks: the demo model answers Paris through chat and text completions, streaming or
not; usage adds up; `/v1/models` lists the served name; bad requests get OpenAI error objects with
the right status and leave everything up; a client that disconnects stops the engine's work; the
seed's client command finds the deployment by itself.

One deployment at a time (the fixture is parametrized at module scope: pytest tears one down before
the next starts), because the machine has 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher import services as svc
from tests.helpers import (
    CPU_ENGINE,
    CPU_ENV,
    DECODE,
    KV_WORKER,
    MONOLITH,
    PREFILL,
    ROOT,
    Deployment,
    Services,
    metric,
    up,
    wait_until,
)

SERVED = "smol"
QUESTION = "what is the capital of france?"
API_KEY_ENV = "FRONTEND_TEST_API_KEY"
API_KEY = "sk-test-0123456789abcdef"  # a test key for the 1P1D deployment's frontend


@dataclass
class Front:
    kind: str
    url: str
    deployment: Deployment
    metrics_ports: list[int]
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def running(self) -> float:
        """Requests the engines are running now (vLLM's own gauge, summed over the workers)."""
        return sum(sum(metric(port, "vllm:num_requests_running").values()) for port in self.metrics_ports)


def _engine(**extra: Any) -> dict[str, Any]:
    return {**CPU_ENGINE, "max-model-len": 2048, "served-model-name": SERVED, "dtype": "float32", **extra}


def _topology(kind: str, demo_model: Path, port: int, metrics: list[int]) -> dict[str, Any]:
    base: dict[str, Any] = {"name": f"fe-{kind}", "model": str(demo_model), "env": dict(CPU_ENV),
                            "frontends": [{"name": "frontend", "port": port, "ready_timeout": 300}]}
    if kind == "monolith":  # its frontend runs 2 processes on the port: every test here goes through both
        base["frontends"][0]["processes"] = 2
        base["engine"] = _engine()
        base["workers"] = [{"name": "vllm", "kind": MONOLITH.name, "ready_timeout": 300, "metrics_port": metrics[0]}]
    elif kind == "1p1d":
        base["engine"] = _engine()
        base["frontends"][0]["api_key_env"] = API_KEY_ENV
        base["workers"] = [
            {"name": "prefill", "kind": PREFILL.name, "ready_timeout": 300, "metrics_port": metrics[0],
             "kv_transfer": {"kv_connector": "ExampleConnector", "kv_role": "kv_producer"}},
            {"name": "decode", "kind": DECODE.name, "ready_timeout": 300, "metrics_port": metrics[1],
             "kv_transfer": {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer"}},
        ]
    else:
        base["engine"] = _engine(**{"block-size": 32, "enable-prefix-caching": True})
        base["workers"] = [{"name": f"worker-{c}", "kind": KV_WORKER.name, "cpus": str(i), "ready_timeout": 300,
                            "metrics_port": metrics[i]} for i, c in enumerate("ab")]
        base["routers"] = [{"name": "router", "strategy": "prefix"}]
    return base


@pytest.fixture(scope="module", params=["monolith", "1p1d", "kv_router"])
def front(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, services: Services,
          demo_model: Path) -> Iterator[Front]:
    kind = request.param
    port = svc.free_port()
    metrics = [svc.free_port(), svc.free_port()]
    topo = _topology(kind, demo_model, port, metrics)
    key = API_KEY if kind == "1p1d" else None
    env = {**services.env, **({API_KEY_ENV: key} if key else {})}
    dep = up(tmp_path_factory.mktemp(kind), topo, Services(services.etcd, services.nats, env))
    try:
        yield Front(kind, f"http://127.0.0.1:{port}", dep, metrics[:1] if kind == "monolith" else metrics, key)
    finally:
        dep.down()


def _openai(front: Front) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{front.url}/v1", api_key=front.api_key or "unused", max_retries=0, timeout=120)


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION}]


# ---- the official openai SDK ------------------------------------------------------------------------

def test_chat_answers_paris_with_usage(front: Front) -> None:
    client = _openai(front)
    r = client.chat.completions.create(model=SERVED, messages=_messages(), max_tokens=24, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.object == "chat.completion" and r.model == SERVED and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None and u.prompt_tokens > 5 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_matches_unary(front: Front) -> None:
    client = _openai(front)
    unary = client.chat.completions.create(model=SERVED, messages=_messages(), max_tokens=24, temperature=0)
    text, usage, finishes, roles = "", None, [], []
    for chunk in client.chat.completions.create(model=SERVED, messages=_messages(), max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            text += c.delta.content or ""
            roles += [c.delta.role] if c.delta.role else []
            finishes += [c.finish_reason] if c.finish_reason else []
    assert roles == ["assistant"] and len(finishes) == 1
    assert text == unary.choices[0].message.content  # greedy: the same answer either way
    assert usage is not None and unary.usage is not None
    assert usage.completion_tokens == unary.usage.completion_tokens
    assert usage.prompt_tokens == unary.usage.prompt_tokens


def test_completions_stream_and_unary(front: Front) -> None:
    client = _openai(front)
    prompt = "The capital of France is the city of"
    unary = client.completions.create(model=SERVED, prompt=prompt, max_tokens=8, temperature=0)
    assert unary.object == "text_completion" and unary.usage is not None
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    streamed, usage = "", None
    for chunk in client.completions.create(model=SERVED, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        streamed += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert streamed == unary.choices[0].text and "Paris" in streamed
    assert usage is not None and usage.completion_tokens == unary.usage.completion_tokens


def test_logprobs_one_per_token(front: Front) -> None:
    client = _openai(front)
    r = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.usage is not None and lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(p <= 0 for p in lp.token_logprobs)
    c = client.chat.completions.create(model=SERVED, messages=_messages(), max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content if c.choices[0].logprobs else None
    assert content and c.usage is not None and len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) <= 2 for t in content)


def test_models_lists_the_served_name(front: Front) -> None:
    models = _openai(front).models.list()
    assert [m.id for m in models.data] == [SERVED]


# ---- curl: bad requests get OpenAI errors, and everything stays up -------------------------------------

def _curl(front: Front, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          method: str = "POST") -> tuple[int, Any]:
    argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, f"{front.url}{path}"]
    for k, v in {**front.headers, "Content-Type": "application/json", **(headers or {})}.items():
        argv += ["-H", f"{k}: {v}"]
    if body is not None:
        argv += ["--data-binary", "@-"]
    proc = subprocess.run(argv, input=body, capture_output=True, timeout=120, check=True)
    text, _, status = proc.stdout.decode(errors="replace").rpartition("\n")
    return int(status), (json.loads(text) if text.strip().startswith("{") else text)


def _chat_body(**over: Any) -> bytes:
    return json.dumps({"model": SERVED, "messages": _messages(), "max_tokens": 8, **over}).encode()


@pytest.mark.parametrize(("case", "body", "status", "param"), [
    ("malformed JSON", b'{"model": "smol", "messages": [', 400, None),
    ("unknown model", json.dumps({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}).encode(),
     404, "model"),
    ("wrong type", _chat_body(max_tokens="lots"), 400, "body.max_tokens"),  # as vLLM names it
    ("huge max_tokens", _chat_body(max_tokens=10**9), 400, "max_tokens"),
    ("empty messages", _chat_body(messages=[]), 400, None),
    ("2 MB prompt", _chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}]), 413, None),
])
def test_bad_requests_get_openai_errors(front: Front, case: str, body: bytes, status: int, param: str | None
                                        ) -> None:
    got, obj = _curl(front, "/v1/chat/completions", body)
    assert got == status, (case, obj)
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], case
    if param is not None:
        assert err["param"] == param, (case, err)
    if case == "unknown model":
        assert SERVED in err["message"]  # it lists what is served
    # Everything stays up: the next request is answered.
    ok, answer = _curl(front, "/v1/chat/completions", _chat_body(temperature=0))
    assert ok == 200 and answer["choices"][0]["message"]["content"]


def test_tools_without_a_parser_are_a_400_naming_the_flags(front: Front) -> None:
    """This deployment's frontend has no tool parser: `tools` is refused as `vllm serve` refuses it, never
    answered with text that ignores them."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    got, obj = _curl(front, "/v1/chat/completions", _chat_body(tools=[tool], tool_choice="auto"))
    assert got == 400 and "--enable-auto-tool-choice" in obj["error"]["message"], obj


def test_structured_output_is_followed(front: Front) -> None:
    """json_schema and choice constrain the answer (the constraint travels to the worker's engine)."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    got, obj = _curl(front, "/v1/chat/completions", _chat_body(max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}))
    assert got == 200 and set(json.loads(obj["choices"][0]["message"]["content"])) == {"city"}, obj
    got, obj = _curl(front, "/v1/chat/completions", _chat_body(structured_outputs={"choice": ["yes", "no"]}))
    assert got == 200 and obj["choices"][0]["message"]["content"] in ("yes", "no"), obj


def test_health_live_metrics_and_auth(front: Front) -> None:
    assert _curl(front, "/health", method="GET")[0] == 200
    assert _curl(front, "/live", method="GET")[0] == 200
    status, text = _curl(front, "/metrics", method="GET")
    assert status == 200 and "vllm_launcher_frontend_requests_total" in text
    if front.api_key:
        status, obj = _curl(front, "/v1/models", headers={"Authorization": "Bearer wrong"}, method="GET")
        assert status == 401 and obj["error"]["type"] == "AuthenticationError"
        # The key is never printed: not in the plan the launcher shows, nor in the frontend's log.
        log = Path(front.deployment.status()["run_dir"], "logs", "frontend.log").read_text()
        assert front.api_key not in log


def _server_pids(front: Front) -> list[int]:
    """The frontend's HTTP processes: the one the launcher started and its children."""
    import psutil

    root = psutil.Process(front.deployment.process("frontend")["pid"])
    return [root.pid, *(c.pid for c in root.children())]


def _total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_frontend_processes_share_the_port_count_as_one_and_a_dead_one_comes_back(front: Front) -> None:
    """`processes: 2`: both accept on the one port, /metrics from either counts the whole group, and a
    child killed -9 is started again while the other keeps serving."""
    if front.kind != "monolith":
        pytest.skip("only the monolith's frontend runs 2 processes (the others run the default, 1 here)")
    import httpx
    import psutil

    pids = _server_pids(front)
    assert len(pids) == 2, pids
    # Its own log lines still print once vLLM's server is built (vLLM 0.32's build_app raised the root level).
    log = Path(front.deployment.status()["run_dir"], "logs", "frontend.log").read_text()
    assert "frontend process 2/2 serves" in log and "frontend ready at" in log, log[-3000:]
    port = int(front.url.rsplit(":", 1)[1])
    body = {"model": SERVED, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    before = _total(_curl(front, "/metrics", method="GET")[1], "vllm_launcher_frontend_requests_total")
    seen: set[int] = set()
    sent = 0

    def serving_pids() -> set[int]:
        out = set()
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in psutil.Process(pid).net_connections("tcp")):
                    out.add(pid)
        return out

    async def burst() -> None:  # 8 clients at once, each on its own connection, watched while they run
        nonlocal sent
        async def one() -> None:
            async with httpx.AsyncClient(base_url=front.url, timeout=120) as http:
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        tasks = [asyncio.create_task(one()) for _ in range(8)]
        sent += len(tasks)
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:  # sample who holds connections until every request is answered
            seen.update(await asyncio.to_thread(serving_pids))
            _, pending = await asyncio.wait(pending, timeout=0.02)
        await asyncio.gather(*tasks)

    deadline = time.monotonic() + 120
    while len(seen) < 2 and time.monotonic() < deadline:
        asyncio.run(burst())
    assert seen == set(pids), f"connections were taken by {seen} of {pids}"
    after = _total(_curl(front, "/metrics", method="GET")[1], "vllm_launcher_frontend_requests_total")
    assert after - before == sent, "/metrics from either process counts both processes' requests"

    child = pids[1]
    psutil.Process(child).kill()
    got = [_curl(front, "/v1/completions", json.dumps(body).encode())[0] for _ in range(5)]  # the other serves
    assert got == [200] * 5, got
    wait_until(lambda: len(_server_pids(front)) == 2 and child not in _server_pids(front), 120,
               "the killed frontend process started again")
    assert front.deployment.process("frontend")["state"] == "ready"


# ---- cancellation ---------------------------------------------------------------------------------------

def test_disconnect_stops_the_engine(front: Front) -> None:
    """A streaming client leaves after 3 tokens of a 2,000-token generation: the engines stop that request."""
    body = json.dumps({"model": SERVED, "messages": _messages(), "max_tokens": 2000, "ignore_eos": True,
                       "stream": True}).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in front.headers.items())]
    sock = socket.create_connection(("127.0.0.1", int(front.url.rsplit(":", 1)[1])), timeout=60)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    received = b""
    while received.count(b'"content":"') < 4:  # the role chunk, then 3 tokens
        part = sock.recv(65536)
        assert part, received
        received += part
    assert front.running() >= 1  # the engine is generating for us
    sock.close()
    left = time.monotonic()
    wait_until(lambda: front.running() == 0, 10, "the engines to stop the request of the client that left",
               every=0.05)
    took = time.monotonic() - left
    print(f"\n{front.kind}: engine running count back to 0 {took * 1000:.0f} ms after the client left")


# ---- the seed's client, and vllm bench serve -------------------------------------------------------------

def test_seed_client_command_verbatim(front: Front) -> None:
    argv = [sys.executable, "-m", "workers.common.client", "--prompt", QUESTION, "--max-tokens", "10",
            "--temperature", "0.5"]
    env = {k: v for k, v in {**os.environ, **front.deployment.env}.items() if k != "LAUNCHER_NAMESPACE"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines and all(line.startswith("Annotated(data=") for line in lines)


def test_vllm_bench_serve_every_request_succeeds(front: Front, tmp_path: Path, demo_model: Path) -> None:
    if front.kind != "monolith":
        pytest.skip("one `vllm bench serve` run is enough for CI time; the frontend path is the same")
    result = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "bench" / "vllm_serve_shim.py"), "bench", "serve", "--backend", "openai-chat",
            "--base-url", front.url, "--endpoint", "/v1/chat/completions", "--model", SERVED,
            "--tokenizer", str(demo_model), "--dataset-name", "random", "--random-input-len", "64",
            "--random-output-len", "16", "--num-prompts", "16", "--max-concurrency", "4", "--seed", "7",
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", result.name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["completed"] == 16 and out.get("failed", 0) == 0, out
    assert out["total_output_tokens"] > 0


# ---- an engine death (last: it restarts a worker) ---------------------------------------------------------

def test_an_engine_death_is_a_process_death(front: Front) -> None:
    """Kill only the EngineCore of the way in (monolith, decode) or of one of two kv workers: the worker
    unregisters and exits at once (not `ready` with a dead engine, answering 500s), the supervisor
    restarts it and says why; the frontend's /health says 503 while nothing serves, and the model
    answers again once the replacement is ready."""
    import psutil

    victim = {"monolith": "vllm", "1p1d": "decode", "kv_router": "worker-a"}[front.kind]
    old = front.deployment.process(victim)["pid"]
    core = next(c for c in psutil.Process(old).children(recursive=True) if "EngineCore" in c.name())
    core.kill()
    killed = time.monotonic()
    wait_until(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE,
               10, "the worker process exits", every=0.05)
    took = time.monotonic() - killed
    print(f"\n{front.kind}: {victim} exited {took:.2f} s after its EngineCore was killed")
    if front.kind == "kv_router":  # worker-b still serves behind the router
        assert _curl(front, "/health", method="GET")[0] == 200
    else:
        wait_until(lambda: _curl(front, "/health", method="GET")[0] == 503, 10, "/health says 503")
    wait_until(lambda: (p := front.deployment.process(victim))["state"] == "ready" and p["pid"] != old, 300,
          "the replacement is ready")
    proc = front.deployment.process(victim)
    assert proc["restarts"] >= 1 and "engine core died" in proc["last_exit"], proc
    wait_until(lambda: _curl(front, "/health", method="GET")[0] == 200, 60, "/health says 200 again")
    assert "Paris" in _openai(front).chat.completions.create(
        model=SERVED, messages=_messages(), max_tokens=16, temperature=0).choices[0].message.content

