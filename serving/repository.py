"""The model repository: finds, loads, warms up and hot-swaps `<repo>/<model>/<version>/model.onnx`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving import metrics
from serving.batcher import Batcher
from serving.config import NUM_CLASSES, Settings, parse_version_policy
from serving.errors import ModelNotFound, ModelNotReady, StartupError
from serving.feedback import AccuracyWindow
from serving.golden import TOLERANCE, accuracy, load_golden_set, short_of_recorded
from serving.runtime import OnnxModel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """`count` more, lasting `seconds` in all."""
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchStatistics:
    """One batch size's executions: joining the inputs, the onnxruntime run, splitting the output."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class Statistics:
    """Triton-style cumulative statistics (the ModelStatistics RPC) for one version in this process.

    Per successful request, as Triton counts them: `queue` (waiting for a run), `compute_input` (lookup and
    decoding the protobuf into an array), `compute_infer` (the onnxruntime run it was part of), `compute_output`
    (drift signals and encoding the response); `success` is the whole handler. The four counts are equal."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStatistics] = field(default_factory=dict)


class ModelVersion:
    """A loaded, warmed-up model version with its batcher, statistics, metrics and feedback state."""

    def __init__(self, name: str, version: int, directory: Path, settings: Settings) -> None:
        started = time.perf_counter()
        self.name, self.version, self.directory = name, str(version), directory
        self.metadata = _read_metadata(directory)
        self.model = OnnxModel(directory / "model.onnx", settings)
        self.provider = self.model.provider
        self.stats = Statistics()
        self.window = AccuracyWindow(settings.accuracy_window)
        self.batcher = Batcher(
            self.model.run,
            self,
            settings.max_batch_size,
            settings.max_queue_delay_us,
            settings.max_queue_images,
            instances=settings.instance_count,
            name=f"{name}-{version}",
        )
        try:
            # On an execution thread of this version: with CUDA graphs (one instance, see Settings) the graphs
            # are captured on the thread that replays them.
            self.batcher.call(lambda: self.model.warm_up(settings.max_batch_size))
            if settings.verify_on_load:
                self.batcher.call(lambda: _verify_accuracy(self.model, self.metadata, settings.data_dir))
        except BaseException:
            self.batcher.close()
            raise
        self.load_seconds = time.perf_counter() - started
        labels = (name, self.version)
        self._request_duration = metrics.REQUEST_DURATION.labels(*labels)
        self._queue_duration = metrics.QUEUE_DURATION.labels(*labels)
        self._compute_duration = metrics.COMPUTE_DURATION.labels(*labels)
        self._batch_size = metrics.BATCH_SIZE.labels(*labels)
        self._images = metrics.IMAGES.labels(*labels)
        self._queue_images = metrics.QUEUE_IMAGES.labels(*labels)
        self._confidence = metrics.CONFIDENCE.labels(*labels)
        self._online = metrics.ONLINE_ACCURACY.labels(*labels)
        self._online.set(float("nan"))  # no labelled answer yet: 0 would read as 0% accurate
        self._ok = metrics.REQUESTS.labels(*labels, "OK")
        self._predicted = [metrics.PREDICTIONS.labels(*labels, str(c)) for c in range(10)]
        self._correct = metrics.FEEDBACK.labels(*labels, "correct")
        self._incorrect = metrics.FEEDBACK.labels(*labels, "incorrect")
        metrics.set_placement(name, self.version, self.provider, self.model.placement)
        metrics.MODEL_LOAD.labels(*labels).set(self.load_seconds)
        if "test_accuracy" in self.metadata:
            metrics.OFFLINE_ACCURACY.labels(*labels).set(float(self.metadata["test_accuracy"]))

    # BatchObserver
    def on_batch(self, images: int, requests: int, seconds: float, input_s: float, output_s: float) -> None:
        """One run's statistics."""
        self._compute_duration.observe(seconds)
        self._batch_size.observe(images)
        self.stats.execution_count += 1
        batch = self.stats.batches.get(images)
        if batch is None:
            batch = self.stats.batches[images] = BatchStatistics()
        batch.compute_input.add(input_s)
        batch.compute_infer.add(seconds)
        batch.compute_output.add(output_s)

    def on_answers(self, probs: np.ndarray, classes: np.ndarray, waits: list[float], seconds: float) -> None:
        """The client answers of one run, all at once: images, queue times and drift signals (the rest of each
        request's figures when it is answered: record_success)."""
        images = classes.size
        self._images.inc(images)
        metrics.observe_many(self._queue_duration, waits)
        if images == 1:
            c = int(classes[0])
            self._predicted[c].inc()
            self._confidence.observe(float(probs[0, c]))
        else:
            for c, count in enumerate(np.bincount(classes, minlength=NUM_CLASSES).tolist()):
                if count:
                    self._predicted[c].inc(count)
            metrics.observe_many(self._confidence, probs.max(axis=1))

    def on_shed(self, reason: str, count: int = 1) -> None:
        metrics.SHED.labels(self.name, self.version, reason).inc(count)

    def on_queue_depth(self, images: int) -> None:
        self._queue_images.set(images)

    def record_success(self, seconds: float, images: int, queue_s: float, input_s: float, infer_s: float,
                       output_s: float) -> None:  # fmt: skip
        """One answered request: its latency and the Triton statistics (updated together: perf_analyzer refuses
        statistics whose counts differ, and reads them while requests are in flight)."""
        self._request_duration.observe(seconds)
        self._ok.inc()
        s = self.stats
        s.success.add(seconds)
        s.queue.add(queue_s)
        s.compute_input.add(input_s)
        s.compute_infer.add(infer_s)
        s.compute_output.add(output_s)
        s.inference_count += images
        s.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, code: str, seconds: float) -> None:
        self._request_duration.observe(seconds)
        metrics.REQUESTS.labels(self.name, self.version, code).inc()
        self.stats.fail.add(seconds)

    def score(self, correct: np.ndarray) -> None:
        """Count labelled answers (True: the prediction was right) and update the window."""
        right = int(correct.sum())
        self._correct.inc(right)
        self._incorrect.inc(correct.size - right)
        self.window.record(correct)
        self._online.set(self.window.accuracy)

    async def unload(self) -> None:
        await self.batcher.drain()
        self.batcher.close()
        metrics.forget_version(self.name, self.version, self.provider, self.model.placement)


# A version is refused if it scores more than golden.TOLERANCE below its recorded accuracy on these images.
VERIFY_IMAGES = 1000


def _verify_accuracy(model: OnnxModel, metadata: dict, data_dir: Path) -> None:
    """Refuse a version that does not reproduce the test accuracy recorded in its metadata.json."""
    if "test_accuracy" not in metadata:
        return
    golden = load_golden_set(data_dir, VERIFY_IMAGES)
    if golden is None:
        return
    score = accuracy(model.run(golden.images), golden.labels)
    recorded = short_of_recorded(score, metadata)
    if recorded is not None:
        raise StartupError(
            f"accuracy {score:.3f} on the first {golden.labels.size} MNIST test images is more than "
            f"{TOLERANCE} below the recorded test_accuracy {recorded:.3f}"
        )


def _read_metadata(directory: Path) -> dict:
    path = directory / "metadata.json"
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"unreadable {path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise StartupError(f"{path} is not a JSON object")
    return metadata


def _is_version(name: str) -> bool:
    """A version is named by ASCII digits: isdigit() alone admits '²', which int() refuses."""
    return name.isascii() and name.isdigit()


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Version directories on disk: integer-named folders holding a model.onnx (others are ignored)."""
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            entries = list(model_dir.iterdir())
        except PermissionError:  # e.g. a volume root's lost+found: not a model
            log.warning("skipping unreadable directory %s", model_dir)
            continue
        versions = {int(v.name): v for v in entries if _is_version(v.name) and (v / "model.onnx").is_file()}
        if versions:
            found[model_dir.name] = versions
    return found


class ModelRepository:
    """The loaded versions of every model; lookups for the request path; reloads for hot-swap."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.model_repository
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.failed: dict[tuple[str, int], str] = {}
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return any(self.models.values())

    def loaded(self, name: str, version: str) -> ModelVersion | None:
        """The loaded version `version` of `name`, or None (no error: for late feedback)."""
        versions = self.models.get(name, {})
        return versions.get(int(version)) if _is_version(version) else None

    def versions(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    def get(self, name: str, version: str = "") -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            if self.root.joinpath(name).is_dir() and not self.ready:
                raise ModelNotReady(f"model '{name}' is not loaded yet")
            raise ModelNotFound(f"unknown model '{name}' (models: {known})")
        if not version:
            return versions[max(versions)]
        if not _is_version(version) or int(version) not in versions:
            have = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {have})")
        return versions[int(version)]

    async def load_all(self) -> None:
        """Start-up load: every version on disk; fails only if nothing at all can be served."""
        if not self.root.is_dir():
            raise StartupError(f"model repository '{self.root}' does not exist (train first: make train)")
        found = scan(self.root)
        if not found:
            raise StartupError(f"model repository '{self.root}' has no <model>/<version>/model.onnx")
        await self._sync(found)
        if not self.ready:
            raise StartupError(f"no model version in '{self.root}' could be loaded: {self.failed}")

    async def rescan(self) -> None:
        """Load versions that appeared, unload versions that disappeared (hot-swap)."""
        if self.root.is_dir():
            await self._sync(scan(self.root))

    async def _sync(self, found: dict[str, dict[int, Path]]) -> None:
        kind, numbers = parse_version_policy(self.settings.version_policy)
        async with self._lock:
            wanted: dict[str, set[int]] = {}
            for name, versions in found.items():
                candidates = sorted(versions, reverse=True)  # newest first: 'latest:N' keeps the newest that load
                if kind == "specific":
                    candidates = [v for v in candidates if v in numbers]
                limit = numbers[0] if kind == "latest" else len(candidates)
                keep = wanted.setdefault(name, set())
                for version in candidates:
                    if len(keep) >= limit:
                        break
                    loaded = self.models.get(name, {})
                    if version in loaded:
                        keep.add(version)
                        continue
                    if (name, version) in self.failed:
                        continue
                    try:
                        mv = await asyncio.to_thread(ModelVersion, name, version, versions[version], self.settings)
                    except Exception as exc:  # one bad version must not take the good ones down
                        self.failed[(name, version)] = str(exc)
                        metrics.MODEL_LOAD_FAILURES.labels(name).inc()
                        log.error("model %s version %d rejected: %s", name, version, exc)
                        continue
                    self.models.setdefault(name, {})[version] = mv
                    keep.add(version)
                    log.info(
                        "loaded model %s version %d on %s in %.2fs (offline accuracy %s)",
                        name, version, mv.provider, mv.load_seconds, mv.metadata.get("test_accuracy", "n/a"),
                    )  # fmt: skip
            for name, loaded in list(self.models.items()):
                for version in [v for v in loaded if v not in wanted.get(name, set())]:
                    mv = loaded.pop(version)
                    why = "removed from the repository" if version not in found.get(name, {}) else "version policy"
                    log.info("unloading model %s version %d (%s: %s)", name, version, why, kind)
                    await mv.unload()
                if not loaded:
                    del self.models[name]
            self.failed = {k: v for k, v in self.failed.items() if k[1] in found.get(k[0], {})}
