"""One loaded model version: its settings, metadata, onnxruntime sessions, batcher and telemetry, verified against
its recorded accuracy before it serves."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from serving.batcher import Batcher
from serving.config import ModelSettings, Settings
from serving.errors import ModelLoadError
from serving.golden import TOLERANCE, accuracy, load_golden_set, short_of_recorded
from serving.runtime import CPU, OnnxModel
from serving.telemetry import VersionTelemetry

log = logging.getLogger(__name__)


class ModelVersion:
    """A loaded, warmed-up model version: its settings, metadata, onnxruntime sessions, batcher and telemetry."""

    def __init__(self, name: str, version: int, directory: Path, settings: ModelSettings, server: Settings) -> None:
        """`settings`: this model's (batch size, queue delay, instances, policy); `server`: everything else."""
        started = time.perf_counter()
        self.name, self.version, self.directory = name, str(version), directory
        self.settings = settings
        self.metadata = _read_metadata(directory)
        self.model = OnnxModel(directory / "model.onnx", server, instances=settings.instance_count)
        self.provider = self.model.provider
        self.telemetry = VersionTelemetry(name, self.version, server.accuracy_window)
        self.batcher = Batcher(
            self.model.run,
            self.telemetry,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_images=server.max_queue_images,
            instances=settings.instance_count,
            name=f"{name}-{version}",
            inline_images=server.inline_max_images if self.provider == CPU and not self.model.bound else 0,
        )
        try:
            # On an execution thread of this version: with CUDA graphs (one instance, see ModelSettings) the graphs
            # are captured on the thread that replays them.
            self.batcher.call(lambda: self.model.warm_up(settings.max_batch_size))
            if server.verify_on_load:
                self.batcher.call(lambda: _verify_accuracy(self.model, self.metadata, server.data_dir))
        except BaseException:
            self.batcher.close()
            raise
        self.load_seconds = time.perf_counter() - started
        self.announce()

    def announce(self) -> None:
        """Set the version's gauges (provider, placement, load time, recorded accuracy): at load, and again when
        it serves on after a reload of the same version was rolled back (the two share their series)."""
        self.telemetry.loaded(self.provider, self.model.placement, self.load_seconds, self.metadata)

    async def unload(self, forget: bool = True) -> None:
        """Answer what is queued, stop the execution threads and, unless another load of the same version takes
        its place (`forget=False`), drop its series."""
        await self.batcher.drain()
        self.batcher.close()
        if forget:
            self.telemetry.forget()


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
        raise ModelLoadError(
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
        raise ModelLoadError(f"unreadable {path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return metadata
