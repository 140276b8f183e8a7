"""Fixtures of the router tests: a real Redis, three real `chatstream serve`
pods, and the real haproxy in front of them (see harness.py)."""

from __future__ import annotations

import pytest
from support.net import free_port, redis_server

from .harness import Dns, Pod, Router, need_haproxy, running


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def pods(redis_url, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pods")
    port = free_port()
    with running(*(Pod(f"pod{i}", f"127.0.0.{i + 1}", port, redis_url, logs) for i in (1, 2, 3))) as started:
        yield list(started)


@pytest.fixture(scope="module")
def proxy(pods, tmp_path_factory):
    need_haproxy()
    with Router(pods, tmp_path_factory.mktemp("router")) as r:
        yield r


@pytest.fixture(scope="module")
def plain_proxy(pods, tmp_path_factory):
    """The same config without its stick rules: the control that shows the
    affinity assertions can fail."""
    need_haproxy()
    with Router(pods, tmp_path_factory.mktemp("plain"), affinity=False) as r:
        yield r


@pytest.fixture(scope="module")
def dns_proxy(pods, tmp_path_factory):
    """The cluster form of the config: pods found through DNS."""
    need_haproxy(dnsmasq=True)
    workdir = tmp_path_factory.mktemp("dns")
    dns = Dns(workdir).start([p.host for p in pods])
    try:
        with Router(pods, workdir, nameserver=f"127.0.0.1:{dns.port}") as r:
            r.dns = dns
            yield r
    finally:
        dns.stop()
