"""Train the seed's network on real MNIST with TensorBoard logging, then export it to the model repository."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.data import INPUT_DIM, NUM_CLASSES, Dataset, DatasetError, load_mnist, one_hot, to_model_input
from training.export import ParityError, export_model
from training.model import ARCHES, HIDDEN_LAYER, build_model

logger = logging.getLogger("training.train")


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters and paths; the defaults are the seed's."""

    epochs: int = 5
    batch_size: int = 128
    seed: int = 0
    arch: str = "mlp"
    learning_rate: float | None = None  # None: RMSprop's default (0.001)
    data_dir: str | os.PathLike = "data"
    source: str | os.PathLike | None = None
    log_dir: str | os.PathLike | None = "logs"  # None: no TensorBoard logs
    run_name: str | None = None
    model_repository: str | os.PathLike = "model_repository"
    model_name: str = "mnist"
    export: bool = True
    verbose: int = 2


@dataclasses.dataclass
class TrainResult:
    """What a training run produced."""

    model: keras.Model
    test_loss: float
    test_accuracy: float
    dataset: Dataset
    hyperparameters: dict[str, Any]
    run_dir: Path | None = None
    version_dir: Path | None = None


def _grid(units: int) -> tuple[int, int]:
    """Most square (rows, cols) with rows * cols == units: 512 -> (16, 32)."""
    rows = max(d for d in range(1, math.isqrt(units) + 1) if units % d == 0)
    return rows, units // rows


class ActivationImages(keras.callbacks.Callback):
    """Writes the inference graph, fixed test images, and each epoch the first Dense layer's activations on
    them as TensorBoard images."""

    def __init__(self, log_dir: Path, images: np.ndarray, layer: str = HIDDEN_LAYER):
        super().__init__()
        self.images = images  # uint8 (k, 28, 28)
        self.layer = layer
        self.writer = tf.summary.create_file_writer(str(log_dir))
        self._probe = None

    def on_train_begin(self, logs=None):
        self._probe = keras.Model(self.model.inputs[0], self.model.get_layer(self.layer).output)
        # The op graph of inference (Keras 3's TensorBoard callback only writes the conceptual graph).
        spec = tf.TensorSpec([None, INPUT_DIM], tf.float32, name="input")
        graph = tf.function(lambda x: self.model(x, training=False)).get_concrete_function(spec).graph
        with self.writer.as_default():
            tf.summary.graph(graph)
            tf.summary.image("inputs", self.images[..., None], step=0, max_outputs=len(self.images))
        self.writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        acts = np.asarray(self._probe(to_model_input(self.images), training=False))
        rows, cols = _grid(acts.shape[1])
        # One shared scale so images are comparable within an epoch; ReLU outputs are >= 0.
        scaled = acts / max(float(acts.max()), 1e-12)
        with self.writer.as_default():
            tf.summary.image(
                f"{self.layer}_activations",
                scaled.reshape(-1, rows, cols, 1),
                step=epoch,
                max_outputs=len(self.images),
                description=f"'{self.layer}' layer activations ({acts.shape[1]} units as {rows}x{cols}) "
                "for the images under 'inputs', scaled by their common max",
            )
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()


def probe_images(dataset: Dataset) -> np.ndarray:
    """The first test image of each digit 0..9 (fixed, so epochs and runs are comparable)."""
    return dataset.x_test[[int(np.argmax(dataset.y_test == d)) for d in range(NUM_CLASSES)]]


def _run_dir(log_dir: Path, config: TrainConfig) -> Path:
    base = config.run_name or f"{config.arch}-seed{config.seed}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir, n = log_dir / base, 1
    while run_dir.exists():
        n += 1
        run_dir = log_dir / f"{base}-{n}"
    return run_dir


def train(config: TrainConfig | None = None, dataset: Dataset | None = None) -> TrainResult:
    """Train (deterministically for a seed), evaluate on the test set, optionally export; see TrainConfig."""
    config = config or TrainConfig()
    if dataset is None:
        dataset = load_mnist(config.data_dir, config.source)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    x_train, y_train = to_model_input(dataset.x_train), one_hot(dataset.y_train)
    x_test, y_test = to_model_input(dataset.x_test), one_hot(dataset.y_test)
    model = build_model(config.arch, config.learning_rate)

    callbacks: list[keras.callbacks.Callback] = []
    run_dir = None
    if config.log_dir is not None:
        run_dir = _run_dir(Path(config.log_dir), config)
        callbacks += [
            keras.callbacks.TensorBoard(log_dir=str(run_dir), histogram_freq=1, write_graph=True),
            ActivationImages(run_dir / "activations", probe_images(dataset)),
        ]
        logger.info("TensorBoard logs: %s (tensorboard --logdir %s)", run_dir, config.log_dir)

    logger.info(
        "training %s: %d epochs, batch %d, seed %d",
        config.arch,
        config.epochs,
        config.batch_size,
        config.seed,
    )
    model.fit(
        x_train, y_train, epochs=config.epochs, batch_size=config.batch_size, callbacks=callbacks,
        verbose=config.verbose,
    )  # fmt: skip
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    hyperparameters = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": "rmsprop",
        # str() of the float32 gives its shortest form: 0.001, not 0.0010000000474974513.
        "learning_rate": float(str(np.float32(model.optimizer.learning_rate.numpy()))),
        "seed": config.seed,
        "arch": config.arch,
    }
    result = TrainResult(model, float(test_loss), float(test_accuracy), dataset, hyperparameters, run_dir)
    if config.export:
        result.version_dir = export_model(
            model, dataset, config.model_repository, config.model_name, hyperparameters=hyperparameters
        )
    return result


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags to a TrainConfig (defaults are the seed's)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--arch", choices=ARCHES, default=d.arch)
    p.add_argument("--learning-rate", type=float, default=None, help="default: RMSprop's (0.001)")
    p.add_argument("--data-dir", default=d.data_dir, help="MNIST cache directory")
    p.add_argument("--source", default=None, help="local Keras mnist.npz or IDX directory instead of the cache")
    p.add_argument("--log-dir", default=d.log_dir, help="TensorBoard log root; each run gets a subdirectory")
    p.add_argument("--run-name", default=None, help="TensorBoard run subdirectory (default: arch-seed-time)")
    p.add_argument("--model-repository", default=d.model_repository)
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")
    a = p.parse_args(argv)
    return TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, arch=a.arch, learning_rate=a.learning_rate,
        data_dir=a.data_dir, source=a.source, log_dir=a.log_dir, run_name=a.run_name,
        model_repository=a.model_repository, model_name=a.model_name, export=not a.no_export,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        result = train(config)
    except (DatasetError, ParityError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 1
    print(f"test_loss: {result.test_loss:.4f}")
    print(f"test_acc: {result.test_accuracy:.4f}")
    if result.version_dir is not None:
        print(f"exported: {result.version_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
