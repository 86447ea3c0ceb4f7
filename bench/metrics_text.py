"""The one reader of /metrics for tests, benchmarks and scripts: Prometheus text parsed by prometheus_client's own
parser."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class Snapshot:
    """One scrape of /metrics."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0.0 when there are none)."""
        return sum(v for n, lab, v in self.samples if n == name and labels.items() <= lab.items())

    def first(self, name: str, **labels: str) -> float:
        """The first such sample's value (0.0 when there is none): for a gauge that is NaN until set."""
        return next((v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()), 0.0)

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.series(name, **labels))

    def quantile(self, name: str, q: float, **labels: str) -> float:
        """Upper bound (`le`) of the bucket holding quantile `q` of histogram `name` (summed over its series)."""
        buckets: dict[float, float] = {}
        for lab, value in self.series(name + "_bucket", **labels):
            bound = math.inf if lab["le"] == "+Inf" else float(lab["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
        total = buckets.get(math.inf, 0.0)
        if not total:
            raise ValueError(f"histogram {name} has no observations")
        return next(bound for bound in sorted(buckets) if buckets[bound] >= q * total)


def scrape(url: str, timeout: float = 2.0) -> Snapshot | None:
    """One scrape of a /metrics URL; None when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return Snapshot(reply.read().decode())
    except OSError:
        return None
