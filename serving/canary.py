"""Canary: a labelled golden set pushed through every live model version's batcher on a timer."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from serving.config import Settings
from serving.golden import GoldenSet, accuracy, load_golden_set, short_of_recorded
from serving.model_version import ModelVersion
from serving.repository import ModelRepository

log = logging.getLogger(__name__)


class Canary:
    """Every `canary_interval_s`, score the golden set through each loaded version and set canary_accuracy.

    Canary batches go through the version's batcher (same session, provider and thread as client traffic),
    so they show in the compute/queue/batch-size metrics and ModelStatistics execution counts, but never in
    requests_total, images_total, request_duration, predictions, confidence or the success counts.
    """

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.golden: GoldenSet | None = None
        self._low: set[tuple[str, str]] = set()  # versions whose last run was logged as low

    async def run(self) -> None:
        """Load the golden set, then evaluate forever (cancel to stop); returns at once without data."""
        self.golden = await asyncio.to_thread(load_golden_set, self.settings.data_dir, self.settings.canary_images)
        if self.golden is None:
            log.warning("canary disabled: no golden set in %s", self.settings.data_dir)
            return
        log.info("canary: %d golden images every %.1fs", self.golden.labels.size, self.settings.canary_interval_s)
        while True:
            await self.run_once()
            await asyncio.sleep(self.settings.canary_interval_s)

    async def run_once(self) -> dict[tuple[str, str], float]:
        """Evaluate every loaded version once; the accuracies by (model, version)."""
        results = {}
        for mv in self.repository.versions():
            try:
                results[(mv.name, mv.version)] = await self.evaluate(mv)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # overload, a version unloaded mid-run, a failing provider
                mv.telemetry.canary(None)
                log.warning("canary run on %s/%s failed: %s", mv.name, mv.version, exc)
        return results

    async def evaluate(self, mv: ModelVersion) -> float:
        golden = self.golden
        assert golden is not None
        step = mv.settings.max_batch_size  # the version's own limit
        chunks = []
        for lo in range(0, golden.labels.size, step):
            chunks.append((await mv.batcher.infer(golden.images[lo : lo + step], client=False)).probs)
        score = accuracy(np.concatenate(chunks), golden.labels)
        if mv not in self.repository.versions():  # unloaded meanwhile: do not bring its series back
            return score
        log.debug("canary: %s/%s scores %.4f", mv.name, mv.version, score)
        mv.telemetry.canary(score)
        self._report(mv, score)
        return score

    def _report(self, mv: ModelVersion, score: float) -> None:
        key = (mv.name, mv.version)
        recorded = short_of_recorded(score, mv.metadata)  # logged when more than golden.TOLERANCE below
        low = recorded is not None
        if low and key not in self._low:
            log.warning(
                "canary: %s/%s scores %.4f on the golden set, recorded test_accuracy %.4f: model or provider broken",
                mv.name, mv.version, score, recorded,
            )  # fmt: skip
        elif not low and key in self._low:
            log.info("canary: %s/%s recovered (%.4f)", mv.name, mv.version, score)
        (self._low.add if low else self._low.discard)(key)
