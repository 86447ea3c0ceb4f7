"""Training end to end on real MNIST: accuracy, determinism, TensorBoard events, export and versioning."""

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from training import export
from training.data import MNIST_SHA256, to_model_input
from training.export import export_model

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def _metadata(version_dir: Path) -> dict:
    return json.loads((version_dir / "metadata.json").read_text())


def test_one_epoch_reaches_90_percent(trained_mlp):
    assert trained_mlp.test_accuracy > 0.9
    assert 0 < trained_mlp.test_loss < 0.5
    assert trained_mlp.hyperparameters == {
        "epochs": 1,
        "batch_size": 128,
        "optimizer": "rmsprop",
        "learning_rate": 0.001,
        "seed": 0,
        "arch": "mlp",
    }


def test_repository_layout_and_metadata(trained_mlp, trained_repository):
    version_dir = trained_mlp.version_dir
    assert version_dir == trained_repository / "mnist" / "1"
    assert sorted(p.name for p in (trained_repository / "mnist").iterdir()) == ["1"]  # no temp dir left
    assert sorted(p.name for p in version_dir.iterdir()) == ["metadata.json", "model.onnx"]
    meta = _metadata(version_dir)
    assert meta["name"] == "mnist" and meta["version"] == 1
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    created = dt.datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - created) < dt.timedelta(hours=1)
    assert meta["parity"]["argmax_mismatches"] == 0 and 0 <= meta["parity"]["max_abs_diff"] <= 1e-5
    # Identical argmax on every image means identical accuracy.
    assert meta["test_accuracy"] == meta["keras_test_accuracy"] == pytest.approx(trained_mlp.test_accuracy)
    assert meta["test_loss"] == pytest.approx(trained_mlp.test_loss, rel=1e-4)
    assert meta["dataset_sha256"] == MNIST_SHA256
    assert meta["hyperparameters"] == trained_mlp.hyperparameters
    assert set(meta["libraries"]) == {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "python"}
    assert meta["libraries"]["onnxruntime"] == ort.__version__
    assert meta["onnx_sha256"] == hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()


def test_onnx_interface_and_outputs(trained_mlp, mnist_data):
    path = trained_mlp.version_dir / "model.onnx"
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*proto.graph.input, *proto.graph.output)
    ]
    assert dims == [["batch", 784], ["batch", 10]]
    assert {o.domain: o.version for o in proto.opset_import}[""] == export.OPSET

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_model_input(mnist_data.x_test[:257])  # odd batch size: the batch dim is dynamic
    (probs,) = session.run(["probabilities"], {"input": x})
    np.testing.assert_allclose(probs, trained_mlp.model.predict(x, verbose=0), atol=1e-5)
    assert (probs.argmax(1) == mnist_data.y_test[:257]).mean() > 0.9


def test_export_twice_numbers_versions(trained_mlp, mnist_data, tmp_path):
    repo = tmp_path / "repo"
    first = export_model(trained_mlp.model, mnist_data, repo, hyperparameters={"note": "a"})
    second = export_model(trained_mlp.model, mnist_data, repo)
    assert (first, second) == (repo / "mnist" / "1", repo / "mnist" / "2")
    assert [_metadata(first)["version"], _metadata(second)["version"]] == [1, 2]
    assert sorted(os.listdir(repo / "mnist")) == ["1", "2"]
    weights = [
        sorted(numpy_helper.to_array(i).tobytes() for i in onnx.load(d / "model.onnx").graph.initializer)
        for d in (first, second)
    ]
    assert weights[0] == weights[1]


def test_next_version_follows_highest_integer_dir(trained_mlp, mnist_data, tmp_path):
    model_dir = tmp_path / "mnist"
    for name in ("7", "3", "notes", ".tmp-stale"):
        (model_dir / name).mkdir(parents=True)
        (model_dir / name / "keep").write_text("x")
    (model_dir / "99").write_text("a file, not a version directory")
    version_dir = export_model(trained_mlp.model, mnist_data, tmp_path, name="mnist")
    assert version_dir.name == "8" and _metadata(version_dir)["version"] == 8
    assert (model_dir / "7" / "keep").read_text() == "x"


def test_concurrent_publishers_never_clobber(tmp_path):
    model_dir = tmp_path / "mnist"
    results, errors = [], []
    barrier = threading.Barrier(6)

    def publish(i):
        try:
            barrier.wait()
            results.append((i, export._publish(model_dir, f"model {i}".encode(), {"writer": i})))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in model_dir.iterdir()) == [str(v) for v in range(1, 7)]
    for i, version_dir in results:
        assert (version_dir / "model.onnx").read_bytes() == f"model {i}".encode()
        assert _metadata(version_dir) == {"writer": i, "version": int(version_dir.name)}


def test_training_is_deterministic_for_a_seed(trained_mlp, mnist_data):
    from training.train import TrainConfig, train

    again = train(TrainConfig(epochs=1, seed=0, log_dir=None, export=False, verbose=0), dataset=mnist_data)
    assert again.version_dir is None and again.run_dir is None
    for a, b in zip(trained_mlp.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.test_accuracy == trained_mlp.test_accuracy


def test_tensorboard_events(trained_mlp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    def load(sub):
        acc = EventAccumulator(str(trained_mlp.run_dir / sub), size_guidance={"tensors": 0})
        acc.Reload()
        return acc

    train = load("train")
    plugins = {tag: train.SummaryMetadata(tag).plugin_data.plugin_name for tag in train.Tags()["tensors"]}
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert plugins[tag] == "scalars" and len(train.Tensors(tag)) == 1
    loss = float(tensor_util.make_ndarray(train.Tensors("epoch_loss")[0].tensor_proto))
    assert 0 < loss < 1
    histograms = {tag for tag, plugin in plugins.items() if plugin == "histograms"}
    assert histograms == {
        f"mnist_mlp/{layer}/{weight}/histogram"
        for layer in ("hidden", "probabilities")
        for weight in ("kernel", "bias")
    }
    assert plugins["keras"] == "graph_keras_model"

    images = load("activations")
    assert images.Graph().node  # the op graph of inference
    inputs = tensor_util.make_ndarray(images.Tensors("inputs")[0].tensor_proto)
    assert inputs[:2].tolist() == [b"28", b"28"] and len(inputs) == 2 + 10  # width, height, 10 PNGs
    events = images.Tensors("hidden_activations")
    assert [e.step for e in events] == [0]
    acts = tensor_util.make_ndarray(events[0].tensor_proto)
    assert acts[:2].tolist() == [b"32", b"16"] and len(acts) == 2 + 10  # 512 units as 16 rows x 32 cols
    assert all(png.startswith(b"\x89PNG") for png in acts[2:])


def test_cli_trains_and_exports(tmp_path):
    cmd = [sys.executable, "-m", "training", "--epochs", "1", "--seed", "1", "--data-dir", str(REPO_ROOT / "data"),
           "--log-dir", str(tmp_path / "logs"), "--run-name", "cli", "--model-repository", str(tmp_path / "repo"),
           "--model-name", "digits"]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert float(lines["test_acc"]) > 0.9 and float(lines["test_loss"]) > 0
    assert Path(lines["exported"]) == tmp_path / "repo" / "digits" / "1"
    meta = _metadata(tmp_path / "repo" / "digits" / "1")
    assert meta["name"] == "digits" and meta["hyperparameters"]["seed"] == 1
    assert meta["test_accuracy"] == pytest.approx(float(lines["test_acc"]), abs=1e-4)
    assert (tmp_path / "logs" / "cli" / "train").is_dir()


def test_cli_reports_a_bad_dataset(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--source", str(bad), "--model-repository", str(tmp_path / "repo")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "DatasetError" in proc.stderr and "not a readable Keras mnist.npz" in proc.stderr
    assert not (tmp_path / "repo").exists()
