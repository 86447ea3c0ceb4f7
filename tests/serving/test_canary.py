"""The canary: a golden set through the live serving path catches a model that loads fine but predicts badly."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_helpers import CANARY, GOLDEN, RUNS, V1, V2, delta, in_process_accuracy, metadata, scrape, stubs, wait_runs
from prometheus_client import REGISTRY
from server_process import ROOT, start_server

from serving.canary import Canary
from serving.client import infer_request, probabilities
from serving.config import Settings
from serving.golden import accuracy, load_golden_set
from serving.repository import ModelRepository


def test_canary_traffic_is_not_client_traffic(canary_server):
    """What the canary alone did (recorded by the fixture before any client request): its batches show only
    in the batch metrics and the execution count, never in the client-facing counters."""
    snap = canary_server.before_clients
    for name in (
        "mnist_serving_requests_total", "mnist_serving_images_total", "mnist_serving_predictions_total",
        "mnist_serving_request_duration_seconds_count", "mnist_serving_confidence_count",
        "mnist_serving_feedback_total",
    ):  # fmt: skip
        assert snap.get(name) == 0, name
    for mv in (V1, V2):
        runs, images = snap.get(RUNS, **mv, result="ok"), snap.get("mnist_serving_batch_size_sum", **mv)
        assert runs >= 2 and images % GOLDEN == 0 and images >= GOLDEN * (runs - 1), (runs, images)
    stats = canary_server.stats_before_clients
    assert (stats.inference_stats.success.count, stats.inference_count) == (0, 0)
    assert stats.execution_count >= 1


def test_canary_on_the_good_model_equals_its_in_process_accuracy(canary_server, two_versions, mnist_data):
    canary = scrape(canary_server).get(CANARY, **V1)
    assert canary == in_process_accuracy(two_versions / "mnist" / "1" / "model.onnx", mnist_data)
    assert canary == pytest.approx(metadata(two_versions)["test_accuracy"], abs=0.03)  # 1,000 of the 10,000


def test_canary_catches_a_corrupted_model_while_the_server_keeps_serving(canary_server, two_versions, mnist_data):
    wait_runs(canary_server, 3, **V2)
    snap = scrape(canary_server)
    assert snap.get(CANARY, **V2) < 0.5
    assert snap.get(CANARY, **V2) == in_process_accuracy(two_versions / "mnist" / "2" / "model.onnx", mnist_data)
    assert snap.get("mnist_serving_offline_accuracy", **V2) == metadata(two_versions)["test_accuracy"]
    log = canary_server.log()
    assert log.count("canary: mnist/2 scores") == 1, log  # once, not every run
    assert "canary: mnist/1 scores" not in log
    channel, infer, _ = stubs(canary_server.url)
    with channel:
        x = mnist_data.x_test[:8]
        before = scrape(canary_server)
        for version in ("1", "2"):
            reply = infer.ModelInfer(infer_request(x, "mnist", version), timeout=10)
            assert probabilities(reply).shape == (8, 10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = scrape(canary_server)
    for labels in (V1, V2):
        assert (
            after.get("mnist_serving_requests_total", **labels, code="OK")
            - before.get("mnist_serving_requests_total", **labels, code="OK")
            == 1
        )


def test_without_mnist_data_the_canary_is_off_and_the_server_serves(trained_repository, mnist_data, tmp_path):
    server = start_server(
        trained_repository, tmp_path, "--canary-interval-s", "0.1", "--data-dir", str(tmp_path / "no-data")
    )
    try:
        deadline = time.monotonic() + 30
        while "canary disabled" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        channel, infer, _ = stubs(server.url)
        with channel:
            infer.ModelInfer(infer_request(mnist_data.x_test[:1], "mnist"), timeout=10)
        snap = scrape(server)
    finally:
        assert server.stop() == 0, server.log()
    assert server.log().count("canary disabled") == 1
    assert not snap.has(CANARY) and not snap.has(RUNS)
    assert snap.get("mnist_serving_requests_total", **V1, code="OK") == 1


async def test_without_a_golden_set_the_canary_task_ends_after_one_warning(tmp_path, caplog):
    """Why the warning above cannot repeat: run() returns instead of looping (no sleep-and-see needed)."""
    settings = Settings(model_repository=tmp_path, data_dir=tmp_path / "no-data", canary_interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="serving.canary"):
        await asyncio.wait_for(Canary(ModelRepository(settings), settings).run(), 30)
    assert [r.getMessage() for r in caplog.records if r.name == "serving.canary"] == [
        f"canary disabled: no golden set in {tmp_path / 'no-data'}"
    ]


def test_golden_set_helpers(tmp_path):
    assert load_golden_set(tmp_path, 10) is None  # no cache: never downloads
    probs = np.array([[0.1, 0.9], [0.2, np.nan], [0.8, 0.2]])
    assert accuracy(probs, np.array([1, 1, 1])) == 1 / 3  # a NaN row is wrong even where argmax would match


# ---------------------------------------------------------------- the same server: labels land on the version asked for

FEEDBACK = "mnist_serving_feedback_total"
ONLINE = "mnist_serving_online_accuracy"
WINDOW = 1000  # the server's default --accuracy-window: one request of this many labels fills it


def test_labels_on_a_request_for_a_specific_version_score_that_version_only(canary_server, mnist_data):
    """mnist/1 is the trained model, mnist/2 answers c+1 for c: each version's counters and window move by
    exactly what its own answers scored, and the other version's do not move."""
    x, y = mnist_data.x_test[:WINDOW], mnist_data.y_test[:WINDOW]
    channel, infer, _ = stubs(canary_server.url)
    with channel:
        for version, other in (("1", "2"), ("2", "1")):
            mine, theirs = {"model": "mnist", "version": version}, {"model": "mnist", "version": other}
            before = scrape(canary_server)
            request = infer_request(x, "mnist", version)
            request.parameters["labels"].string_param = ",".join(map(str, y.tolist()))
            reply = infer.ModelInfer(request, timeout=30)
            after = scrape(canary_server)
            assert reply.model_version == version
            correct = int((probabilities(reply).argmax(axis=1) == y).sum())
            assert delta(before, after, FEEDBACK, **mine, outcome="correct") == correct, version
            assert delta(before, after, FEEDBACK, **mine, outcome="incorrect") == WINDOW - correct, version
            assert after.get(ONLINE, **mine) == correct / WINDOW  # the window holds exactly these answers
            assert delta(before, after, FEEDBACK, **theirs) == 0, version
            np.testing.assert_equal(after.get(ONLINE, **theirs), before.get(ONLINE, **theirs))
            if version == "2":
                assert correct < WINDOW // 10  # the permuted model is almost always wrong: it really was v2


# ---------------------------------------------------------------- in process: real models, batchers and metrics

BATCH = 64  # max_batch_size; the golden set below is one batch, so a canary run is one batcher call


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def _loaded(trained_repository, mnist_data, tmp_path, model: str, versions=(1,), **overrides):
    """A real ModelRepository (onnxruntime, batchers, metrics in this process) holding `model`/<versions>."""
    for v in versions:
        shutil.copytree(trained_repository / "mnist" / "1", tmp_path / model / str(v))
    settings = Settings(
        model_repository=tmp_path, data_dir=ROOT / "data", max_batch_size=BATCH, canary_images=BATCH, **overrides,
    )  # fmt: skip
    repository = ModelRepository(settings)
    await repository.load_all()
    canary = Canary(repository, settings)
    canary.golden = load_golden_set(settings.data_dir, settings.canary_images)
    return repository, canary


async def test_canary_errors_are_counted_and_the_next_good_run_recovers(
    trained_repository, mnist_data, tmp_path, caplog
):
    """A full queue (client overload) makes a canary run fail: counted as an error, the last accuracy kept;
    once the load is gone the canary scores again."""
    repository, canary = await _loaded(
        trained_repository, mnist_data, tmp_path, "canary-err", max_queue_images=2 * BATCH
    )
    [mv] = repository.versions()
    labels = {"model": "canary-err", "version": "1"}
    expected = accuracy(mv.model.run(canary.golden.images), canary.golden.labels)
    assert await canary.run_once() == {("canary-err", "1"): expected}
    assert _sample(f"{RUNS}", **labels, result="ok") == 1 and _sample(CANARY, **labels) == expected

    images = canary.golden.images
    busy, running = threading.Event(), threading.Event()
    hold = asyncio.create_task(asyncio.to_thread(mv.batcher.call, lambda: running.set() or busy.wait(30)))
    await asyncio.to_thread(running.wait, 10)  # the execution thread is busy: what comes now waits
    clients = [asyncio.create_task(mv.batcher.infer(images)) for _ in range(2)]  # two batches: the queue is full
    await asyncio.sleep(0.05)
    assert mv.batcher.queued_images == 2 * BATCH
    with caplog.at_level(logging.WARNING, logger="serving.canary"):
        assert await canary.run_once() == {}
    assert _sample(RUNS, **labels, result="error") == 1 and _sample(RUNS, **labels, result="ok") == 1
    assert _sample(CANARY, **labels) == expected  # the last known score stays
    assert "canary run on canary-err/1 failed: queue full" in caplog.text
    busy.set()
    await asyncio.gather(hold, *clients)

    assert await canary.run_once() == {("canary-err", "1"): expected}  # load gone: scored again
    assert _sample(RUNS, **labels, result="ok") == 2 and _sample(RUNS, **labels, result="error") == 1
    for mv in repository.versions():
        await mv.unload()


async def test_low_score_is_logged_once_then_recovery_once(trained_repository, mnist_data, tmp_path, caplog):
    repository, canary = await _loaded(trained_repository, mnist_data, tmp_path, "canary-low")
    [mv] = repository.versions()
    recorded = mv.metadata["test_accuracy"]
    with caplog.at_level(logging.INFO, logger="serving.canary"):
        mv.metadata["test_accuracy"] = 1.5  # out of reach: every run now reads as broken
        for _ in range(3):
            await canary.run_once()
        mv.metadata["test_accuracy"] = recorded
        for _ in range(2):
            await canary.run_once()
    messages = [r.getMessage() for r in caplog.records if r.name == "serving.canary"]
    assert [m.split(" scores")[0].split(" (")[0] for m in messages] == [
        "canary: canary-low/1",  # the warning, once for three low runs
        "canary: canary-low/1 recovered",  # once for two good runs
    ], messages
    assert "recorded test_accuracy 1.5000: model or provider broken" in messages[0]
    for mv in repository.versions():
        await mv.unload()


async def test_a_version_unloaded_mid_canary_does_not_get_its_series_back(trained_repository, mnist_data, tmp_path):
    repository, canary = await _loaded(trained_repository, mnist_data, tmp_path, "canary-gone", versions=(1, 2))
    v1 = repository.models["canary-gone"][1]
    gone, kept = {"model": "canary-gone", "version": "1"}, {"model": "canary-gone", "version": "2"}
    run = asyncio.create_task(canary.run_once())
    while not v1.batcher.unanswered_images:  # the canary's batch for version 1 is with the batcher
        await asyncio.sleep(0)
    shutil.rmtree(tmp_path / "canary-gone" / "1")
    await repository.rescan()  # unloads version 1: drains that batch, drops the version's series
    results = await asyncio.wait_for(run, 30)
    assert _sample(CANARY, **gone) is None  # its gauge did not come back after forget_version
    assert _sample(RUNS, **gone, result="ok") is None and _sample(RUNS, **gone, result="error") is None
    assert _sample(CANARY, **kept) == results[("canary-gone", "2")]
    assert list(await canary.run_once()) == [("canary-gone", "2")]  # later runs cover what is loaded only
    for mv in repository.versions():
        await mv.unload()
