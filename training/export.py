"""Keras -> ONNX (tf2onnx), a parity gate against Keras with onnxruntime, atomic repository writes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from serving.contract import INPUT_NAME, OUTPUT_NAME
from training.data import INPUT_DIM, NUM_CLASSES, Dataset, one_hot, to_model_input

logger = logging.getLogger("training.export")

BATCH_DIM = "batch"
OPSET = 17
PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
TMP_PREFIX = ".tmp-"  # not an integer, so the server ignores in-progress exports
MAX_ABS_DIFF = 1e-5
_EPS = 1e-7  # Keras' epsilon, clipping probabilities in categorical crossentropy


class ParityError(Exception):
    """The ONNX model does not reproduce the Keras model's outputs."""


@dataclasses.dataclass(frozen=True, eq=False)
class ParityReport:
    """How the ONNX model compares with Keras on the test set."""

    max_abs_diff: float
    argmax_mismatches: int
    onnx_probs: np.ndarray = dataclasses.field(repr=False)


def to_onnx(model, opset: int = OPSET) -> bytes:
    """Convert a Keras 3 model with a flat (None, 784) float input to serialized ONNX bytes.

    tf2onnx.convert.from_keras fails on Keras 3, so the model is wrapped in a tf.function."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, INPUT_DIM], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=spec)
    def serve(x):
        # A dict output makes tf2onnx name the graph output after its key.
        return {OUTPUT_NAME: model(x, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    graph = proto.graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise RuntimeError(f"unexpected ONNX interface: inputs {inputs}, outputs {outputs}")
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    graph.name = getattr(model, "name", "mnist")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run_onnx(onnx_bytes: bytes, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Probabilities from onnxruntime (CPU) for float32 inputs (N, 784)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    parts = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def check_parity(
    onnx_bytes: bytes, keras_probs: np.ndarray, x: np.ndarray, max_abs_diff: float = MAX_ABS_DIFF
) -> ParityReport:
    """Run the ONNX model on x; raise ParityError unless every argmax matches Keras and |dprob| <= tol."""
    try:
        onnx_probs = run_onnx(onnx_bytes, x)
    except Exception as e:  # noqa: BLE001 - a model onnxruntime cannot run fails the gate
        raise ParityError(f"onnxruntime could not run the exported model: {type(e).__name__}: {e}") from e
    if onnx_probs.shape != keras_probs.shape:
        raise ParityError(f"ONNX output shape {onnx_probs.shape} != Keras output shape {keras_probs.shape}")
    diff = float(np.max(np.abs(onnx_probs.astype(np.float64) - keras_probs), initial=0.0))
    mismatches = int(np.count_nonzero(onnx_probs.argmax(axis=1) != keras_probs.argmax(axis=1)))
    if not np.isfinite(diff) or mismatches or diff > max_abs_diff:
        raise ParityError(
            f"ONNX model disagrees with Keras on {len(x)} test images: {mismatches} argmax mismatches, "
            f"max |dprob| {diff:.3g} (allowed 0 and {max_abs_diff:g}); nothing was written"
        )
    return ParityReport(max_abs_diff=diff, argmax_mismatches=mismatches, onnx_probs=onnx_probs)


def categorical_crossentropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean categorical crossentropy, clipped like Keras."""
    p = np.clip(probs.astype(np.float64), _EPS, 1.0 - _EPS)
    return float(-np.mean(np.sum(one_hot(labels) * np.log(p), axis=1)))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced the model."""
    import keras
    import numpy
    import onnx
    import onnxruntime
    import tensorflow
    import tf2onnx

    return {
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def existing_versions(model_dir: Path) -> list[int]:
    """Integer version directories under <repo>/<name>, sorted."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _metadata_bytes(metadata: dict[str, Any]) -> bytes:
    return (json.dumps(metadata, indent=2) + "\n").encode()


def _publish(model_dir: Path, onnx_bytes: bytes, metadata: dict[str, Any]) -> Path:
    """Write into a hidden temp dir, then rename it to the next free version number."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_file(tmp / MODEL_FILE, onnx_bytes)
        version = max(existing_versions(model_dir), default=0) + 1
        while True:
            metadata = {**metadata, "version": version}
            _write_file(tmp / METADATA_FILE, _metadata_bytes(metadata))
            _fsync_dir(tmp)
            target = model_dir / str(version)
            if not target.exists():
                try:
                    # Fails if a concurrent export already took this (non-empty) version directory.
                    os.rename(tmp, target)
                    _fsync_dir(model_dir)
                    return target
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            version = max([version, *existing_versions(model_dir)]) + 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_model(
    model,
    dataset: Dataset,
    repository: str | os.PathLike,
    name: str = "mnist",
    hyperparameters: dict[str, Any] | None = None,
    onnx_model: bytes | None = None,
) -> Path:
    """Convert (or take onnx_model as given), pass the parity gate on the whole test set, then publish
    <repository>/<name>/<version>/{model.onnx, metadata.json}; returns the version directory."""
    x_test = to_model_input(dataset.x_test)
    onnx_bytes = to_onnx(model) if onnx_model is None else onnx_model
    keras_probs = model.predict(x_test, batch_size=1024, verbose=0)
    keras_accuracy = float(np.mean(keras_probs.argmax(axis=1) == dataset.y_test))

    # The gate runs before anything touches the repository.
    report = check_parity(onnx_bytes, keras_probs, x_test)
    onnx_accuracy = float(np.mean(report.onnx_probs.argmax(axis=1) == dataset.y_test))
    onnx_loss = categorical_crossentropy(report.onnx_probs, dataset.y_test)
    logger.info(
        "parity OK on %d test images: max |dprob| %.3g, 0 argmax mismatches; ONNX test_acc %.4f loss %.4f",
        len(x_test),
        report.max_abs_diff,
        onnx_accuracy,
        onnx_loss,
    )
    metadata = {
        "name": name,
        "version": None,  # set when the version number is claimed
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, INPUT_DIM]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
        "test_accuracy": onnx_accuracy,
        "test_loss": onnx_loss,
        "keras_test_accuracy": keras_accuracy,
        "parity": {"max_abs_diff": report.max_abs_diff, "argmax_mismatches": report.argmax_mismatches},
        "dataset_sha256": dataset.sha256,
        "hyperparameters": dict(hyperparameters or {}),
        "libraries": library_versions(),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    version_dir = _publish(Path(repository) / name, onnx_bytes, metadata)
    logger.info("exported %s", version_dir)
    return version_dir
