"""Model threads follow the container's CPU limit, not the node's core count."""

from __future__ import annotations

import pytest

from chatstream.threads import Choice, cgroup_cpu_limit, choose_threads, cpu_request, passive_wait, set_wait_policy


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("content, expected", [("max 100000\n", None), ("200000 100000\n", 2.0),
                                               ("150000 100000\n", 1.5), ("50000 100000\n", 0.5)])
def test_cgroup_v2_quota(tmp_path, content, expected):
    write(tmp_path / "cpu.max", content)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None


def test_choose_threads():
    def threads(*args):
        return choose_threads(*args).threads
    assert threads(0, 64, 2.0) == 2          # a 2-CPU pod on a 64-core node
    assert threads(0, 64, 1.5) == 1          # never more threads than the quota can run
    assert threads(0, 64, 0.5) == 1
    assert threads(0, 4, 16.0) == 4          # nor more than the schedulable CPUs
    assert threads(0, 8, None) == 8          # a bare process: every schedulable CPU
    assert threads(3, 64, 1.0) == 3          # an explicit setting wins


@pytest.mark.parametrize("request_cpus, expected", [(0.1, 1), (0.9, 1), (1.4, 1), (1.5, 2), (1.8, 2), (8.0, 8),
                                                    (100.0, 64)])
def test_a_pod_without_a_limit_runs_the_threads_of_its_request(request_cpus, expected):
    # Two pods requesting 0.9 CPU each on a 2-core node ran 2 threads each (the node's cores) and served
    # 0.11x of one bare process; the request is what each was given.
    choice = choose_threads(0, 64, None, request_cpus)
    assert (choice.threads, choice.reason) == (expected, "request")


def test_a_limit_wins_over_the_request():
    assert choose_threads(0, 64, 2.0, 8.0) == Choice(2, "limit")
    assert choose_threads(4, 64, 2.0, 8.0) == Choice(4, "set")


@pytest.mark.parametrize("raw, expected", [("900", 0.9), ("2000", 2.0), ("0", None), ("", None), ("x", None)])
def test_the_request_comes_in_millicores(raw, expected):
    assert cpu_request({"CHATSTREAM_CPU_REQUEST": raw}) == expected
    assert cpu_request({}) is None


@pytest.mark.parametrize("environ, reason", [({}, "no CPU limit or request"),
                                             ({"CHATSTREAM_CPU_REQUEST": "900"}, "CPU request 0.9")])
def test_configure_sets_torchs_threads_and_logs_why(monkeypatch, caplog, environ, reason):
    import logging

    import torch

    from chatstream import threads
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)  # whatever cgroup this test runs in
    monkeypatch.delenv("CHATSTREAM_CPU_REQUEST", raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="chatstream"):
            choice = threads.configure()
        assert torch.get_num_threads() == choice.threads
        assert reason in caplog.text
        assert threads.info()["threads"] == str(choice.threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads, request_cpus, passive", [
    (2, 0.92, True),     # 2 pods x 2 threads on 2 cores: 8 tok/s spinning, 45 sleeping
    (2, 1.5, True),      # a request rounded up
    (2, 1.85, False),    # the 2-core node's one pod: 81 tok/s spinning, 70 sleeping
    (1, 0.46, True),     # one thread: no OpenMP worker waits either way
    (8, 8.0, False),
    (16, None, False),   # a bare process
])
def test_threads_beyond_the_request_sleep_instead_of_spinning(threads, request_cpus, passive):
    assert passive_wait(threads, request_cpus) is passive


def test_the_wait_policy_is_set_before_torch_only_when_unset(monkeypatch):
    from chatstream import threads
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("CHATSTREAM_CPU_REQUEST", "920")
    environ = {}
    assert set_wait_policy(2, environ) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_wait_policy(2, environ) is None and environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setenv("CHATSTREAM_CPU_REQUEST", "2000")
    environ = {}
    assert set_wait_policy(2, environ) is None and environ == {}


def test_the_server_decides_the_wait_policy_before_torch_is_imported():
    # libgomp reads OMP_WAIT_POLICY once, when torch loads it: set any later, it changes nothing.
    import os
    import subprocess
    import sys
    probe = """
import importlib.abc, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Watch())
from chatstream import cli
cli.main(["serve"])
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(CHATSTREAM_CPU_REQUEST="920", CHATSTREAM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert "at torch import: PASSIVE" in out.stdout, out.stdout + out.stderr
