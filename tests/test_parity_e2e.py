"""The frontend answers as `vllm serve` does: the same requests to both, side by side, on the demo model.

`vllm serve` (vLLM's CPU build, through bench/vllm_serve_shim.py) and a deployment of the same model with
the same engine flags and tool parser each get every request below, at temperature 0 (or a fixed seed):
every endpoint `vllm serve` offers a generative model and every parameter class (tools with a parser,
structured output of each kind, n, echo, batches, logprobs, prompt logprobs, stop, min_tokens, penalties,
the seed's bounds, out-of-vocabulary ids, multi-part content, streaming and not). For each request both
return the same status; a 200 has the same text, finish_reason, usage and tool calls; an error is an
error object of the same type. The servers run one after the other (2 cores): vLLM's answers are
collected first, then the deployment's, then compared.

Topologies: the monolith for every request, and the KV-router and 1P1D ones for the streaming requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher import services as svc
from tests.helpers import CPU_ENGINE, CPU_ENV, DECODE, KV_WORKER, MONOLITH, PREFILL, ROOT, Services, up, wait_until

SERVED = "smol"
ENGINE = {**CPU_ENGINE, "max-model-len": 2048, "served-model-name": SERVED, "dtype": "float32"}
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
Q = "what is the capital of france?"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def chat(content: Any = Q, **over: Any) -> dict[str, Any]:
    return {"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "temperature": 0, **over}


def cmpl(prompt: Any = "The capital of France is", **over: Any) -> dict[str, Any]:
    return {"model": SERVED, "prompt": prompt, "max_tokens": 12, "temperature": 0, **over}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any = None  # JSON, or bytes sent as they are; None: GET
    streaming: bool = False


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
CASES = [
    # chat
    Case("chat", CHAT, chat()),
    Case("chat stream", CHAT, chat(stream=True), True),
    Case("chat stream usage", CHAT, chat(stream=True, stream_options={"include_usage": True}), True),
    Case("chat stream continuous usage", CHAT,
         chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}), True),
    Case("chat n=2", CHAT, chat(n=2)),
    Case("chat n=2 stream", CHAT, chat(n=2, stream=True), True),
    Case("chat logprobs", CHAT, chat(logprobs=True, top_logprobs=3, max_tokens=6)),
    Case("chat prompt_logprobs", CHAT, chat(prompt_logprobs=2, max_tokens=4)),
    Case("chat stop", CHAT, chat(stop=["Paris"], max_tokens=24)),
    Case("chat stop stream", CHAT, chat(stop=["Paris"], max_tokens=24, stream=True), True),
    Case("chat min_tokens", CHAT, chat(min_tokens=12, max_tokens=14)),
    Case("chat penalties", CHAT, chat(presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.3,
                                      max_tokens=24)),
    Case("chat seeded sampling", CHAT, chat(temperature=0.9, seed=1234, max_tokens=16)),
    Case("chat seed above 2^63", CHAT, chat(seed=2**63 + 5)),
    Case("chat max_completion_tokens", CHAT, chat(max_completion_tokens=5)),
    Case("chat multi-part content", CHAT, chat([{"type": "text", "text": "what is the capital"},
                                                {"type": "text", "text": "of france?"}])),
    Case("chat system + history", CHAT, {**chat(), "messages": [
        {"role": "system", "content": "You answer in one word."}, {"role": "user", "content": Q},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "and of italy?"}]}),
    Case("chat json_object", CHAT, chat("Give me a person as JSON.", response_format={"type": "json_object"},
                                        max_tokens=40)),
    Case("chat json_schema", CHAT, chat("Give me a person.", max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})),
    Case("chat json_schema stream", CHAT, chat("Give me a person.", max_tokens=40, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}), True),
    Case("chat choice", CHAT, chat("Is Paris in France?", structured_outputs={"choice": ["yes", "no"]})),
    Case("chat regex", CHAT, chat("A phone number:", structured_outputs={"regex": r"\d{3}-\d{4}"})),
    Case("chat grammar", CHAT, chat("Pick a color.", structured_outputs={
        "grammar": 'root ::= "red" | "green" | "blue"'})),
    Case("chat tools auto", CHAT, chat("What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice="auto",
                                       max_tokens=40)),
    Case("chat tools named", CHAT, chat("What is the weather in Paris?", tools=[WEATHER, TIME], max_tokens=40,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    Case("chat tools required", CHAT, chat("What is the weather in Paris?", tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=40)),
    Case("chat tools required stream", CHAT, chat("What is the weather in Paris?", tools=[WEATHER, TIME],
                                                  tool_choice="required", max_tokens=40, stream=True), True),
    Case("chat tools named unknown", CHAT, chat("hi", tools=[WEATHER],
                                                tool_choice={"type": "function", "function": {"name": "nope"}})),
    Case("chat logit_bias", CHAT, chat(logit_bias={"330": 100}, max_tokens=4)),
    Case("chat echo", CHAT, {**chat(), "messages": [{"role": "user", "content": Q},
                                                   {"role": "assistant", "content": "The capital"}],
                             "echo": True, "add_generation_prompt": False, "continue_final_message": True}),
    Case("chat max_tokens too large", CHAT, chat(max_tokens=10**9)),
    Case("chat unknown model", CHAT, {**chat(), "model": "gpt-17"}),
    Case("chat empty messages", CHAT, {**chat(), "messages": []}),
    Case("chat wrong type", CHAT, chat(max_tokens="lots")),
    Case("chat malformed JSON", CHAT, b'{"model": "smol", "messages": ['),
    Case("chat invalid UTF-8", CHAT, b'{"model": "smol", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    # completions
    Case("completion", CMPL, cmpl()),
    Case("completion stream", CMPL, cmpl(stream=True, stream_options={"include_usage": True}), True),
    Case("completion echo", CMPL, cmpl(echo=True)),
    Case("completion echo logprobs", CMPL, cmpl(echo=True, logprobs=2, max_tokens=4)),
    Case("completion batch", CMPL, cmpl(["The capital of France is", "One, two, three,"])),
    Case("completion batch stream", CMPL, cmpl(["The capital of France is", "One, two, three,"], stream=True), True),
    Case("completion token ids", CMPL, cmpl([504, 3575, 282, 4649, 314])),
    Case("completion out-of-vocabulary id", CMPL, cmpl([1, 2, 999999])),
    Case("completion logprobs", CMPL, cmpl(logprobs=3, max_tokens=5)),
    Case("completion prompt_logprobs", CMPL, cmpl(prompt_logprobs=1, max_tokens=3)),
    Case("completion n=2", CMPL, cmpl(n=2)),
    Case("completion stop", CMPL, cmpl(stop=[" Paris", "."], max_tokens=20)),
    Case("completion choice", CMPL, cmpl("Is the sky blue? Answer:", structured_outputs={"choice": ["yes", "no"]})),
    Case("completion json_object", CMPL, cmpl("A person as JSON:", response_format={"type": "json_object"},
                                              max_tokens=30)),
    Case("completion ignore_eos", CMPL, cmpl(ignore_eos=True, max_tokens=30)),
    Case("completion suffix", CMPL, cmpl(suffix="and that is all.")),
    # the other endpoints
    Case("tokenize prompt", "/tokenize", {"model": SERVED, "prompt": "The capital of France is"}),
    Case("tokenize messages", "/tokenize", {"model": SERVED, "messages": [{"role": "user", "content": Q}]}),
    Case("detokenize", "/detokenize", {"model": SERVED, "tokens": [504, 3575, 282, 4649, 314]}),
    Case("detokenize out-of-vocabulary", "/detokenize", {"model": SERVED, "tokens": [999999]}),
    Case("version", "/version"),
    Case("models", "/v1/models"),
    Case("responses", "/v1/responses", {"model": SERVED, "input": Q, "max_output_tokens": 16, "temperature": 0}),
    Case("messages (Anthropic)", "/v1/messages", {"model": SERVED, "max_tokens": 16, "temperature": 0,
                                                  "messages": [{"role": "user", "content": Q}]}),
]
STREAMING = [c for c in CASES if c.streaming]

# Fields that differ between any two answers (ids, clocks) or only name the server.
RANDOM = {"id", "created", "created_at", "system_fingerprint", "permission", "request_id"}


@dataclass
class Answer:
    status: int
    body: Any  # JSON, the SSE events' JSON (a list; "[DONE]" as a string), or text


def send(base: str, case: Case) -> Answer:
    body = case.body
    if isinstance(body, dict) and case.path in (CHAT, CMPL):
        # A prefix cached by an earlier request may change the numerics (and so a near-tie at temperature 0);
        # a salt of its own per request keeps each answer independent of what ran before, on both servers.
        body = {**body, "cache_salt": f"parity {case.name}"}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + case.path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    if text.startswith("data: "):
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]
        return Answer(status, [e if e == "[DONE]" else json.loads(e) for e in events])
    try:
        return Answer(status, json.loads(text))
    except ValueError:
        return Answer(status, text)


def scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in RANDOM}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def merged_stream(events: list[Any]) -> dict[str, Any]:
    """What a client makes of a stream: per choice its text (content, reasoning, tool calls' names and
    arguments), its finish reason; the usage; errors; whether it ended with [DONE]."""
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"choices": choices, "usage": None, "errors": [], "done": events[-1:] == ["[DONE]"]}
    for event in events:
        if event == "[DONE]":
            continue
        if "error" in event:
            out["errors"].append(scrub(event["error"]))
            continue
        if event.get("usage"):
            out["usage"] = event["usage"]
        for choice in event.get("choices") or []:
            c = choices.setdefault(choice["index"], {"text": "", "reasoning": "", "tools": {}, "finish": None,
                                                      "stop_reason": None, "logprobs": []})
            delta = choice.get("delta") or {}
            c["text"] += choice.get("text") or delta.get("content") or ""
            c["reasoning"] += delta.get("reasoning") or delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                t = c["tools"].setdefault(call["index"], {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                t["name"] += fn.get("name") or ""
                t["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason") is not None:
                c["finish"], c["stop_reason"] = choice["finish_reason"], choice.get("stop_reason")
    return out


def comparable(case: Case, answer: Answer) -> Any:
    if answer.status != 200:
        body = answer.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return {"type": body["error"].get("type"), "param": body["error"].get("param")}
        return body  # e.g. FastAPI's {"detail": ...}: the same text
    if isinstance(answer.body, list):
        return merged_stream(answer.body)
    return scrub(answer.body)


# ---- the two servers -----------------------------------------------------------------------------------

def vllm_serve_answers(model: Path, cases: list[Case], log: Path) -> list[Answer]:
    port = svc.free_port()
    argv = [sys.executable, str(ROOT / "bench" / "vllm_serve_shim.py"), "serve", str(model), "--port", str(port)]
    for key, value in ENGINE.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    argv += TOOL_FLAGS
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **CPU_ENV}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(base + "/health", timeout=2).status == 200, timeout=300,
                   what="vllm serve to answer /health", every=0.5, alive=proc)
        return [send(base, c) for c in cases]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def deployment_answers(kind: str, model: Path, cases: list[Case], tmp: Path, services: Services) -> list[Answer]:
    port = svc.free_port()
    topo: dict[str, Any] = {"name": f"parity-{kind}", "model": str(model), "env": dict(CPU_ENV), "engine": ENGINE,
                            "frontends": [{"name": "frontend", "port": port, "ready_timeout": 300,
                                           "args": TOOL_FLAGS}]}
    if kind == "monolith":
        topo["workers"] = [{"name": "vllm", "kind": MONOLITH.name, "ready_timeout": 300}]
    elif kind == "1p1d":
        topo["workers"] = [
            {"name": "prefill", "kind": PREFILL.name, "ready_timeout": 300,
             "kv_transfer": {"kv_connector": "ExampleConnector", "kv_role": "kv_producer"}},
            {"name": "decode", "kind": DECODE.name, "ready_timeout": 300,
             "kv_transfer": {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer"}}]
    else:
        topo["engine"] = {**ENGINE, "block-size": 32, "enable-prefix-caching": True}
        topo["workers"] = [{"name": f"worker-{c}", "kind": KV_WORKER.name, "cpus": str(i), "ready_timeout": 300}
                           for i, c in enumerate("ab")]
        topo["routers"] = [{"name": "router", "strategy": "prefix"}]
    dep = up(tmp, topo, services)
    try:
        return [send(f"http://127.0.0.1:{port}", c) for c in cases]
    finally:
        dep.down()


@dataclass
class Pair:
    case: Case
    theirs: Answer
    ours: Answer


@pytest.fixture(scope="module")
def monolith_pairs(demo_model: Path, services: Services, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Pair]:
    tmp = tmp_path_factory.mktemp("parity")
    theirs = vllm_serve_answers(demo_model, CASES, tmp / "vllm-serve.log")
    ours = deployment_answers("monolith", demo_model, CASES, tmp, services)
    return {c.name: Pair(c, t, o) for c, t, o in zip(CASES, theirs, ours, strict=True)}


def check(pair: Pair) -> None:
    case, theirs, ours = pair.case, pair.theirs, pair.ours
    assert ours.status == theirs.status, (case.name, theirs.body, ours.body)
    if case.name == "models":
        assert [(m["root"], m["max_model_len"]) for m in ours.body["data"]] == \
            [(m["root"], m["max_model_len"]) for m in theirs.body["data"]]
        return
    assert comparable(case, ours) == comparable(case, theirs), case.name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_monolith_answers_as_vllm_serve(monolith_pairs: dict[str, Pair], case: Case) -> None:
    check(monolith_pairs[case.name])


def test_parity_covers_enough(monolith_pairs: dict[str, Pair]) -> None:
    """At least 40 requests, a few of each answer: 200s, errors, and streams."""
    statuses = [p.theirs.status for p in monolith_pairs.values()]
    assert len(statuses) >= 40 and statuses.count(200) >= 30 and len(set(statuses)) >= 3
    assert sum(p.case.streaming for p in monolith_pairs.values()) >= 6


@pytest.fixture(scope="module", params=["kv_router", "1p1d"])
def streaming_pairs(request: pytest.FixtureRequest, monolith_pairs: dict[str, Pair], demo_model: Path,
                    services: Services, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    ours = deployment_answers(request.param, demo_model, STREAMING, tmp_path_factory.mktemp(request.param), services)
    return {c.name: Pair(c, monolith_pairs[c.name].theirs, o) for c, o in zip(STREAMING, ours, strict=True)}


@pytest.mark.parametrize("case", STREAMING, ids=lambda c: c.name)
def test_other_topologies_stream_as_vllm_serve(streaming_pairs: dict[str, Pair], case: Case) -> None:
    check(streaming_pairs[case.name])
