"""Clients that stream answers continuously, counting how each stream ended."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
from support.client import ChatEvents
from support.kube import kubectl

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."


def host_pids(pod: dict, comm: str | None = None) -> list[int]:
    """The host PIDs of the processes named `comm` (any name: None) in `pod` (the real node is this
    machine): found by the pod's UID in their cgroup path (cgroupfs writes it with dashes, the systemd
    driver with underscores)."""
    uid = pod["metadata"]["uid"]
    marks = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{entry.name}/cgroup") as f:
                cgroup = f.read()
        except OSError:
            continue
        if (comm is None or name == comm) and any(m in cgroup for m in marks):
            found.append(int(entry.name))
    return found


def stream_and_force_delete(url: str, body: dict, pod: dict, ns: str) -> tuple[ChatEvents, Exception | None,
                                                                               float | None]:
    """Streams `body` from url's /v1/chat/completions and, once three pieces have come, loses `pod` as a
    crash does: SIGKILL to every process of it, then a force delete (no grace). Returns the stream's
    events, the error that ended it (None: it just ended) and when the pod was lost (None: the stream
    ended first).

    Why the SIGKILL: a force delete only removes the API object; the kubelet stops the containers when
    it gets to it, with its stop signal first and SIGKILL 2 s later at the earliest. The router and the
    server both treat that stop signal as "finish what is in flight", so a slow kubelet let a
    256-token stream end with a clean [DONE] in CI (2026-12-05), and the test then proved nothing
    about a stream whose carrier dies."""
    stream, error, t_deleted = ChatEvents(), None, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=60)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if stream.feed(line) and stream.events == 3:
                    pids = set(host_pids(pod)) - set(host_pids(pod, "pause"))
                    assert pids, f"no process of pod {pod['metadata']['name']} on this node"
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    kubectl("delete", "pod", pod["metadata"]["name"], "-n", ns, "--grace-period=0", "--force")
                    t_deleted = time.monotonic()
    except httpx.HTTPError as err:
        error = err
    return stream, error, t_deleted


@dataclass
class Tally:
    completed: int = 0
    cut: list[str] = field(default_factory=list)      # began, then ended without [DONE]
    failed: list[str] = field(default_factory=list)   # refused or errored before any token
    longest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __str__(self) -> str:
        return (f"{self.completed} streams completed, {len(self.cut)} cut, {len(self.failed)} failed, "
                f"longest {self.longest:.1f}s")


def stream_once(url: str, max_tokens: int, timeout: float, headers: dict | None = None) -> tuple[str, str, float]:
    """One streamed chat; returns (outcome, detail, seconds): outcome is
    completed, cut or failed."""
    t0 = time.monotonic()
    seen = ChatEvents(t0)
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout, headers=headers) as r:
            if r.status_code != 200:
                return "failed", f"HTTP {r.status_code}: {r.read()[:200]!r}", time.monotonic() - t0
            seen.read(r.iter_lines())
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        outcome = "cut" if seen.events else "failed"
        return outcome, f"{type(err).__name__}: {err} after {seen.events} pieces", time.monotonic() - t0
    if not seen.done:
        return ("cut" if seen.events else "failed"), f"ended without [DONE] after {seen.events} pieces", time.monotonic() - t0
    return "completed", "", time.monotonic() - t0


class Load:
    """n clients, each streaming one answer after another until stopped;
    with new_conversations, each answer is a conversation of its own (its own
    X-Session-Id), which the router places by load."""

    def __init__(self, url: str, clients: int = 8, max_tokens: int = 96, timeout: float = 120,
                 new_conversations: bool = False):
        self.url, self.max_tokens, self.timeout = url, max_tokens, timeout
        self.new_conversations = new_conversations
        self.tally = Tally()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stopping.is_set():
            headers = {"X-Session-Id": uuid.uuid4().hex} if self.new_conversations else None
            outcome, detail, took = stream_once(self.url, self.max_tokens, self.timeout, headers)
            with self.tally.lock:
                self.tally.longest = max(self.tally.longest, took)
                if outcome == "completed":
                    self.tally.completed += 1
                else:
                    getattr(self.tally, outcome).append(detail)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 10)
