"""Hosts, service URLs and core sets: parsed and bounded before anything uses them."""

from __future__ import annotations

import pytest

from launcher.addresses import MAX_DEVICES, check_host, check_urls, parse_cpu_sets


@pytest.mark.parametrize(("host", "ok"), [
    ("10.0.0.1", True), ("::1", True), ("node-1.cluster.local", True), ("my_nats", True),
    ("decode host", False), ("-bad", False), ("300.1.1.1", False), ("", False), ("a" * 64, False),
])
def test_hosts(host: str, ok: bool) -> None:
    if ok:
        check_host(host)
    else:
        with pytest.raises(ValueError):
            check_host(host)


@pytest.mark.parametrize(("value", "error"), [
    ("http://127.0.0.1:2379", None), ("https://a:2379,http://[::1]:2380", None), ("http://etcd", None),
    ("etcd://h:1", "must start with http:// or https://"), ("http://h:0", "has port 0"),
    ("http://h:99999", "bad port"), ("http://h:x", "bad port"), (" , ", "give at least one"),
    ("http://:2379", "names no host"), ("127.0.0.1:2379", "must start with"),
])
def test_etcd_urls(value: str, error: str | None) -> None:
    if error is None:
        check_urls(value, ("http", "https"), "etcd")
    else:
        with pytest.raises(ValueError, match=error):
            check_urls(value, ("http", "https"), "etcd")


def test_cpu_sets_are_parsed_per_rank_and_bounded() -> None:
    assert parse_cpu_sets("0-1|2,3") == [frozenset({0, 1}), frozenset({2, 3})]
    with pytest.raises(ValueError, match="beyond"):
        parse_cpu_sets(f"0-{MAX_DEVICES}")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_cpu_sets("3-1")
    with pytest.raises(ValueError, match="cannot read"):
        parse_cpu_sets("0-")
    with pytest.raises(ValueError, match="empty core set"):
        parse_cpu_sets("0||1")
