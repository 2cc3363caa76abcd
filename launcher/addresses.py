"""Parse and bound the strings in a topology that name places: service URLs, hosts, core sets.

Each function raises ValueError with a message a user can act on; pydantic validators call them,
so the error lands on the field's file:line and everything downstream gets checked values.
Bounds matter as much as syntax: `cpus: "0-999999999"` must be refused, not expanded.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlparse, urlsplit

from launcher.redact import redact_text

MAX_DEVICES = 4096  # core or GPU index bound: more than any host has, small enough to expand
ETCD_SCHEMES = ("http", "https")
NATS_SCHEMES = ("nats", "tls")

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # "_": docker compose service names have it
_CORE = re.compile(r"\d{1,9}")


def check_host(host: str) -> None:
    """An IP address (v4 or v6) or a hostname (RFC 1123 labels, plus "_" as container names use)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is neither an IP address nor a hostname")
    if all(label.isdigit() for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid IP address")


def check_url(url: str, schemes: tuple[str, ...], what: str) -> None:
    shown = redact_text(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError:
        raise ValueError(f"{what} URL {shown!r} has a bad port: give a number from 1 to 65535") from None
    if parts.scheme not in schemes:
        raise ValueError(f"{what} URL {shown!r} must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError(f"{what} URL {shown!r} names no host")
    try:
        check_host(parts.hostname)
    except ValueError as exc:
        raise ValueError(f"{what} URL {shown!r}: {exc}") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{what} URL {shown!r} has port {port}: give a number from 1 to 65535")


def check_urls(value: str, schemes: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of URLs, at least one; each checked."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"give at least one {what} URL")
    for url in urls:
        check_url(url, schemes, what)
    return urls


def parse_cpu_sets(spec: str) -> list[frozenset[int]]:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND: '0-3', '0,2', '0-1|2-3' (one set per TP rank), bounded."""
    ranks = spec.split("|")
    if len(ranks) > MAX_DEVICES:
        raise ValueError(f"{len(ranks)} core sets: at most {MAX_DEVICES}")
    out: list[frozenset[int]] = []
    for rank_part in ranks:
        cores: set[int] = set()
        for piece in (p.strip() for p in rank_part.split(",")):
            if not piece:
                continue
            lo_text, sep, hi_text = piece.partition("-")
            if not _CORE.fullmatch(lo_text.strip()) or (sep and not _CORE.fullmatch(hi_text.strip())):
                raise ValueError(f"cannot read {piece!r}: write core numbers like '0-3', '0,2' or '0|1'")
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
            if hi >= MAX_DEVICES:
                raise ValueError(f"core {hi} in {piece!r} is beyond {MAX_DEVICES - 1}: no host has that many cores")
            if lo > hi:
                raise ValueError(f"{piece!r} runs backwards: write '{hi}-{lo}'")
            cores.update(range(lo, hi + 1))
        if not cores:
            raise ValueError(f"{spec!r} has an empty core set: write e.g. '0-3' or '0|1'")
        out.append(frozenset(cores))
    return out


LOOPBACK_HOSTS = {"localhost", "::1", "0.0.0.0", ""}


def is_loopback(address: str) -> bool:
    """127.x, localhost, ::1 (and 0.0.0.0, which is not an address another host can dial)."""
    host = urlparse(address if "://" in address else f"//{address}").hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")
