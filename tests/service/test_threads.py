"""Model threads follow the container's CPU limit, not the node's core count."""

from __future__ import annotations

import pytest

from chatstream.threads import cgroup_cpu_limit, choose_threads


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
    assert choose_threads(0, 64, 2.0) == 2          # a 2-CPU pod on a 64-core node
    assert choose_threads(0, 64, 1.5) == 1          # never more threads than the quota can run
    assert choose_threads(0, 64, 0.5) == 1
    assert choose_threads(0, 4, 16.0) == 4          # nor more than the schedulable CPUs
    assert choose_threads(0, 8, None) == 8
    assert choose_threads(3, 64, 1.0) == 3          # an explicit setting wins
