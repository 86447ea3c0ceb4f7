"""`python -m serving.client`: predict PNGs, evaluate the test set, health — against the real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from serving.client import image_to_mnist


def client(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", "--url", server.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_reports_the_accuracy_in_metadata(server, trained_repository):
    recorded = json.loads((trained_repository / "mnist/1/metadata.json").read_text())["test_accuracy"]
    for datatype, *stream in (("UINT8",), ("FP32",), ("UINT8", "--stream")):
        result = client(server, "evaluate", "--batch-size", "500", "--datatype", datatype, *stream)
        assert result.returncode == 0, result.stderr
        assert ("ModelStreamInfer)" if stream else "ModelInfer)") in result.stdout
        accuracy = float(re.search(r"accuracy (\d\.\d+) on 10000 test images", result.stdout).group(1))
        assert accuracy == round(recorded, 4)
        assert re.search(r"p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", result.stdout)


def test_mnist_preprocessing_is_identity_on_mnist_digits(mnist_data, tmp_path):
    """A real MNIST digit saved as PNG comes back nearly as it was (already 20x20-fitted and centred)."""
    digit = mnist_data.x_test[0]
    Image.fromarray(digit).save(tmp_path / "d.png")
    back = image_to_mnist(tmp_path / "d.png").astype(int)
    assert np.abs(back - digit.astype(int)).mean() < 20


def test_predict_pngs_both_polarities(server, mnist_data, tmp_path):
    paths, labels = [], []
    for i in range(8):
        digit = mnist_data.x_test[i]
        big = Image.fromarray(digit).resize((112, 112), Image.Resampling.BILINEAR)
        if i % 2:  # dark ink on white paper, as a photo or a drawing program gives
            big = Image.fromarray(255 - np.asarray(big))
        path = tmp_path / f"digit{i}.png"
        big.convert("RGB").save(path)
        paths.append(str(path))
        labels.append(int(mnist_data.y_test[i]))
    result = client(server, "predict", *paths)
    assert result.returncode == 0, result.stderr
    predicted = [int(m) for m in re.findall(r"\.png: (\d) ", result.stdout)]
    assert len(predicted) == 8
    assert sum(p == y for p, y in zip(predicted, labels, strict=True)) >= 7


def test_health_command(server):
    ok = client(server, "health")
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    assert client(server, "health", "--service", "mnist").returncode == 0
    missing = client(server, "health", "--service", "resnet")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr


def test_client_reports_server_errors_cleanly(server, tmp_path):
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "blank.png")
    result = client(server, "--model", "resnet", "predict", str(tmp_path / "blank.png"))
    assert result.returncode == 2
    assert "NOT_FOUND" in result.stderr and "Traceback" not in result.stderr
