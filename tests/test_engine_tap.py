"""The worker's tap on vLLM's engine-core outputs (workers.engine.OutputTap), without an engine: what a
frontend receives is what the engine core produced, step by step, however late the worker reads it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from workers.engine import OutputTap, tokens_chunk


def core_output(request_id: str, tokens: list[int], finish: Any = None) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, new_token_ids=tokens, new_logprobs=None,
                           new_prompt_logprobs_tensors=None, prefill_stats=None, finish_reason=finish,
                           stop_reason=None)


class Processor:
    """vLLM's OutputProcessor as the tap sees it: request states by internal id, and process_outputs,
    which here does what vLLM's output collector does to a lagging reader's output: extend the token
    list it was handed (the engine core output's own list)."""

    def __init__(self) -> None:
        self.request_states = {"r-1234": SimpleNamespace(external_req_id="r")}
        self.first: list[int] | None = None

    def process_outputs(self, outputs: list[Any], *args: Any, **kwargs: Any) -> None:
        for out in outputs:
            if self.first is None:
                self.first = out.new_token_ids
            else:
                self.first.extend(out.new_token_ids)


def test_the_tap_copies_each_step_as_the_engine_core_sent_it() -> None:
    length = SimpleNamespace(name="LENGTH")  # vLLM's FinishReason.LENGTH, as the tap reads it
    processor = Processor()
    tap = OutputTap(SimpleNamespace(output_processor=processor))
    sink = tap.open("r")
    processor.process_outputs([core_output("r-1234", [5]), core_output("other-9", [7])])
    processor.process_outputs([core_output("r-1234", [6, 8])])
    processor.process_outputs([core_output("r-1234", [9], length)])
    assert tokens_chunk(sink) == {"token_ids": [5, 6, 8, 9], "finish_reason": "length", "stop_reason": None}
    tap.close("r")
    assert tap.sinks == {}
