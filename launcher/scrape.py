"""Read the Prometheus metrics that processes serve, for `launcher status`'s load column.

Engine workers serve vLLM's own metrics (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:request_success_total`) on their plan-assigned port; the frontend serves its own on its HTTP
port. Scrapes run in threads with a short timeout: a process that does not answer shows no load.
"""

from __future__ import annotations

import contextlib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, float]


def metrics_url(spec: dict[str, Any]) -> str | None:
    ports = spec.get("ports") or {}
    if "metrics" in ports:
        return f"http://127.0.0.1:{ports['metrics']}/metrics"
    if spec.get("url"):
        return f"{spec['url']}/metrics"
    return None


def scrape(url: str, timeout: float = 0.5) -> Samples | None:
    """Every sample summed over its labels, by name (counters under their `_total` name)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode(errors="replace")
    except Exception:
        return None
    out: Samples = {}
    with contextlib.suppress(Exception):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def scrape_all(urls: dict[str, str], timeout: float = 0.5) -> dict[str, Samples | None]:
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        results = pool.map(lambda u: scrape(u, timeout), urls.values())
        return dict(zip(urls.keys(), results, strict=True))


def load_text(kind: str, before: Samples | None, after: Samples | None, seconds: float) -> str:
    """One short line: running/waiting/KV for engines, in flight and requests/s for the frontend."""
    if after is None:
        return "-"

    def rate(name: str) -> float:
        if before is None or seconds <= 0:
            return 0.0
        return max(0.0, after.get(name, 0.0) - before.get(name, 0.0)) / seconds

    if kind == "frontend":
        inflight = after.get("vllm_launcher_frontend_inflight_requests", 0.0)
        return f"{inflight:.0f} in flight, {rate('vllm_launcher_frontend_requests_total'):.1f} req/s"
    running = after.get("vllm:num_requests_running", 0.0)
    waiting = after.get("vllm:num_requests_waiting", 0.0)
    kv = after.get("vllm:kv_cache_usage_perc", 0.0) * 100
    return f"{running:.0f} run, {waiting:.0f} wait, KV {kv:.0f}%, {rate('vllm:request_success_total'):.1f} req/s"
