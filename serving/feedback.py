"""Ground truth for online accuracy: labels scored against signed receipts, duplicates refused, a sliding window."""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving import telemetry
from serving.errors import InvalidReceipt
from serving.receipts import Receipt, ReceiptKey


class ReceiptLedger:
    """Which labels of which receipts this process has counted, remembered until the receipts expire.

    At most `capacity` receipts are remembered; beyond that the oldest are forgotten and every receipt issued
    no later than them is refused as expired, so a label is never counted twice (the usable age shrinks
    instead)."""

    def __init__(self, capacity: int, max_age_s: float) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.floor = -math.inf  # receipts issued at or before this were forgotten early: refused
        self._counted: dict[bytes, int] = {}  # receipt id -> bit mask of the indexes counted
        self._by_issue: list[tuple[int, bytes]] = []  # heap: oldest receipt first

    def __len__(self) -> int:
        return len(self._counted)

    def claim(self, receipt: Receipt, indexes: list[int], now: float | None = None) -> list[bool]:
        """For each index, True if it is counted now for the first time (and mark it counted)."""
        now = time.time() if now is None else now
        heap, counted = self._by_issue, self._counted
        while heap and heap[0][0] + self.max_age_s < now:  # expired: can never be claimed again
            del counted[heapq.heappop(heap)[1]]
        if receipt.issued <= self.floor:
            raise InvalidReceipt(
                "expired",
                "receipt is older than the oldest this server still remembers for duplicate detection "
                f"(--feedback-capacity {self.capacity} receipts)",
                receipt.model,
                receipt.version,
            )
        mask = counted.get(receipt.id)
        if mask is None:
            mask = 0
            heapq.heappush(heap, (receipt.issued, receipt.id))
        fresh = []
        for i in indexes:
            bit = 1 << i
            fresh.append(not mask & bit)
            mask |= bit
        counted[receipt.id] = mask
        while len(counted) > self.capacity:
            issued, forgotten = heapq.heappop(heap)
            del counted[forgotten]
            self.floor = max(self.floor, issued)
        return fresh


class Scorer(Protocol):
    """A loaded model version's scoring (window and counters): telemetry.VersionTelemetry.score."""

    def score(self, correct: np.ndarray) -> None: ...


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    matched: int  # labels scored now
    correct: int  # of those, the ones the prediction got right
    duplicate: int  # labels already counted for this receipt (not counted again)


class Feedback:
    """Scores labels against receipts: any process holding the key can, no state shared beyond the key."""

    def __init__(self, key: ReceiptKey, ledger: ReceiptLedger, loaded) -> None:
        self.key = key
        self.ledger = ledger
        self._loaded = loaded  # (model, version) -> Scorer | None

    def score(
        self, token: str, indexes: list[int], labels: list[int], model: str = "", version: str = ""
    ) -> FeedbackResult:
        """Score `labels[i]` for image `indexes[i]` of the receipt `token`; InvalidReceipt if it cannot be."""
        try:
            receipt = self.key.verify(token)
            if (model and model != receipt.model) or (version and version != receipt.version):
                raise InvalidReceipt(
                    "invalid",
                    f"receipt is for model '{receipt.model}' version {receipt.version}, "
                    f"not '{model}' version '{version or 'any'}'",
                    receipt.model,
                    receipt.version,
                )
            n = receipt.classes.size
            outside = [i for i in indexes if i >= n]
            if outside:
                raise InvalidReceipt(
                    "invalid", f"index {outside[0]} is outside the receipt's {n} images", receipt.model, receipt.version
                )
            fresh = self.ledger.claim(receipt, indexes)
        except InvalidReceipt as exc:  # a receipt that did not verify is counted without model and version
            telemetry.feedback(exc.model, exc.version, exc.outcome, len(labels))
            raise
        keep = np.flatnonzero(fresh)
        duplicate = len(labels) - keep.size
        if duplicate:
            telemetry.feedback(receipt.model, receipt.version, "duplicate", duplicate)
        correct = receipt.classes[np.asarray(indexes, dtype=np.int64)[keep]] == np.asarray(labels)[keep]
        if correct.size:
            scorer = self._loaded(receipt.model, receipt.version)
            if scorer is not None:
                scorer.score(correct)
            else:  # a version unloaded since it answered still gets its late labels counted
                right = int(correct.sum())
                telemetry.feedback(receipt.model, receipt.version, "correct", right)
                telemetry.feedback(receipt.model, receipt.version, "incorrect", correct.size - right)
        return FeedbackResult(int(correct.size), int(correct.sum()), duplicate)
