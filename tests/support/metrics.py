"""Prometheus text (a /metrics page), read with prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, timeout: float = 10) -> str:
    """The /metrics page under `url` (a server's base URL)."""
    return httpx.get(f"{url}/metrics", timeout=timeout).text


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample: (sample name, sorted (label, value) pairs) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of the samples named `name` that carry `labels` (over all their other labels);
    `default` when there are none (without one, their absence fails the test)."""
    values = [v for (n, have), v in samples(text).items() if n == name and labels.items() <= dict(have).items()]
    if not values:
        if default is None:
            raise AssertionError(f"{name} not in /metrics")
        return default
    return sum(values)


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples named `name`, by the value of one label."""
    return {dict(labels)[label]: v for (n, labels), v in samples(text).items() if n == name}
