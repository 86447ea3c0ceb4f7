"""Ground truth for online accuracy: recent predictions in bounded memory and a sliding accuracy window."""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np


class PredictionStore:
    """Predicted classes of recent requests by request id, evicting the oldest beyond `capacity` images."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._images = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def images(self) -> int:
        return self._images

    def put(self, request_id: str, classes: np.ndarray) -> None:
        old = self._items.pop(request_id, None)
        if old is not None:
            self._images -= old.size
        self._items[request_id] = classes
        self._images += classes.size
        while self._images > self.capacity and self._items:
            _, evicted = self._items.popitem(last=False)
            self._images -= evicted.size

    def get(self, request_id: str, index: int) -> int | None:
        """The class predicted for image `index` of request `request_id`, or None if unknown/expired."""
        classes = self._items.get(request_id)
        if classes is None or not 0 <= index < classes.size:
            return None
        return int(classes[index])


class AccuracyWindow:
    """Fraction correct over the last `size` labelled answers."""

    def __init__(self, size: int) -> None:
        self._outcomes: deque[bool] = deque(maxlen=size)
        self._correct = 0

    def __len__(self) -> int:
        return len(self._outcomes)

    def record(self, correct: np.ndarray) -> None:
        outcomes = self._outcomes
        for ok in correct.tolist():
            if len(outcomes) == outcomes.maxlen:
                self._correct -= outcomes[0]
            outcomes.append(ok)
            self._correct += ok

    @property
    def accuracy(self) -> float:
        return self._correct / len(self._outcomes) if self._outcomes else float("nan")
