"""Ground truth and online accuracy: the bounded prediction store, the window, and exact numbers on /metrics."""

from __future__ import annotations

import math
import uuid

import grpc
import numpy as np
import pytest
from metrics_helpers import delta, feedback_request, scrape, stubs
from server_process import start_server

from serving.client import infer_request, probabilities
from serving.feedback import AccuracyWindow, PredictionStore
from serving.protos import feedback_pb2

M = {"model": "mnist", "version": "1"}
FEEDBACK = "mnist_serving_feedback_total"
ONLINE = "mnist_serving_online_accuracy"
# The session server keeps the default --accuracy-window: one request of this many labels fills it.
WINDOW = 1000


# ---------------------------------------------------------------- units


def test_store_stays_bounded_under_a_million_ids_and_evicts_oldest_first():
    store = PredictionStore(capacity=1000)
    for i in range(1_000_000):
        store.put(f"id-{i}", np.array([i % 10], dtype=np.int8))
        if store.images > 1000:
            pytest.fail(f"{store.images} images held after {i + 1} puts")
    assert (len(store), store.images) == (1000, 1000)
    assert store.get("id-998999", 0) is None  # the newest evicted one
    assert all(store.get(f"id-{i}", 0) == i % 10 for i in range(999_000, 1_000_000))
    assert store.get("id-0", 0) is None


def test_store_with_mixed_batch_sizes_keeps_exactly_the_newest_that_fit():
    capacity, sizes = 1000, [1 + i % 7 for i in range(100_000)]
    store = PredictionStore(capacity)
    for i, n in enumerate(sizes):
        store.put(str(i), np.full(n, i % 10, dtype=np.int8))
        assert store.images <= capacity
    kept, total = 0, 0
    while total + sizes[-1 - kept] <= capacity:  # the longest suffix that fits
        total += sizes[-1 - kept]
        kept += 1
    assert (len(store), store.images) == (kept, total)
    first_kept = len(sizes) - kept
    assert store.get(str(first_kept), sizes[first_kept] - 1) == first_kept % 10
    assert store.get(str(first_kept - 1), 0) is None
    assert store.get(str(first_kept), sizes[first_kept]) is None  # index past the request


def test_store_replaces_a_repeated_id_and_never_keeps_an_oversized_request():
    store = PredictionStore(capacity=10)
    store.put("a", np.array([1, 2, 3], dtype=np.int8))
    store.put("a", np.array([4, 5], dtype=np.int8))
    assert (len(store), store.images, store.get("a", 0), store.get("a", 2)) == (1, 2, 4, None)
    store.put("big", np.zeros(11, dtype=np.int8))  # more than the whole store: evicts everything, itself too
    assert (len(store), store.images, store.get("big", 0)) == (0, 0, None)


def test_window_over_a_million_answers_is_the_last_size_answers():
    rng = np.random.default_rng(0)
    outcomes = rng.random(1_000_000) < 0.9
    window = AccuracyWindow(1000)
    assert math.isnan(window.accuracy)
    for lo in range(0, outcomes.size, 4096):
        end = min(lo + 4096, outcomes.size)
        window.record(outcomes[lo:end])
        expected = outcomes[max(0, end - 1000) : end]
        assert window.accuracy == int(expected.sum()) / expected.size
    assert len(window) == 1000
    assert window.accuracy == int(outcomes[-1000:].sum()) / 1000


# ---------------------------------------------------------------- over the wire (session server: deltas)


def _predict(infer, images: np.ndarray, **kw) -> np.ndarray:
    return probabilities(infer.ModelInfer(infer_request(images, "mnist", **kw), timeout=30)).argmax(axis=1)


def _wrong(predicted: np.ndarray) -> np.ndarray:
    """Labels that are certainly wrong for these predictions."""
    return (predicted + 1) % 10


def test_labels_parameter_gives_the_exact_online_accuracy(server, mnist_data):
    x, y = mnist_data.x_test[:WINDOW], mnist_data.y_test[:WINDOW]
    channel, infer, _ = stubs(server.url)
    with channel:
        predicted = _predict(infer, x)  # no labels, no id: scored nowhere
        labels = y.copy()
        labels[:100] = _wrong(predicted[:100])  # 100 known mistakes on top of the model's own
        correct = int((predicted == labels).sum())
        before = scrape(server)
        request = infer_request(x, "mnist")
        request.parameters["labels"].string_param = ",".join(map(str, labels.tolist()))
        assert (probabilities(infer.ModelInfer(request, timeout=30)).argmax(axis=1) == predicted).all()
        after = scrape(server)

        assert delta(before, after, FEEDBACK, **M, outcome="correct") == correct
        assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == WINDOW - correct
        assert delta(before, after, FEEDBACK, **M, outcome="unknown") == 0
        assert after.get(ONLINE, **M) == correct / WINDOW  # the window holds exactly these answers

        # `label` (int64) for a batch of 1
        single = infer_request(x[:1], "mnist")
        single.parameters["label"].int64_param = int(_wrong(predicted[:1])[0])
        infer.ModelInfer(single, timeout=30)
        last = scrape(server)
    assert delta(after, last, FEEDBACK, **M, outcome="incorrect") == 1
    assert delta(after, last, FEEDBACK, **M, outcome="correct") == 0
    assert last.get(ONLINE, **M) == (correct - int(predicted[0] == labels[0])) / WINDOW  # oldest answer left


def test_feedback_by_request_id_gives_the_exact_online_accuracy(server, mnist_data):
    x, y = mnist_data.x_test[1000 : 1000 + WINDOW], mnist_data.y_test[1000 : 1000 + WINDOW]
    request_id = f"fb-{uuid.uuid4()}"
    channel, infer, feedback = stubs(server.url)
    with channel:
        predicted = _predict(infer, x, request_id=request_id)
        labels = y.copy()
        labels[:250] = _wrong(predicted[:250])
        correct = int((predicted == labels).sum())
        before = scrape(server)
        request = feedback_request(request_id, labels)
        request.labels.append(feedback_pb2.Label(index=WINDOW, label=3))  # past the request: unknown
        reply = feedback.SendFeedback(request, timeout=30)
        after = scrape(server)
    assert (reply.matched, reply.correct, reply.unknown) == (WINDOW, correct, 1)
    assert delta(before, after, FEEDBACK, **M, outcome="correct") == correct
    assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == WINDOW - correct
    assert delta(before, after, FEEDBACK, **M, outcome="unknown") == 1
    assert after.get(ONLINE, **M) == correct / WINDOW


def test_unknown_ids_are_counted_not_errors_and_bad_labels_are_refused(server, mnist_data):
    channel, infer, feedback = stubs(server.url)
    with channel:
        before = scrape(server)
        reply = feedback.SendFeedback(feedback_request(f"never-sent-{uuid.uuid4()}", [1, 2, 3]), timeout=10)
        assert (reply.matched, reply.correct, reply.unknown) == (0, 0, 3)
        refused = {
            "label 10": feedback_request("x", [10]),
            "label -1": feedback_request("x", [-1]),
            "no request id": feedback_request("", [1]),
        }
        for name, request in refused.items():
            with pytest.raises(grpc.RpcError) as err:
                feedback.SendFeedback(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        with pytest.raises(grpc.RpcError) as err:
            feedback.SendFeedback(feedback_request("x", [1], model="resnet"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bad = infer_request(mnist_data.x_test[:3], "mnist")
        bad.parameters["labels"].string_param = "1,2,11"
        with pytest.raises(grpc.RpcError) as err:
            infer.ModelInfer(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = scrape(server)
    assert delta(before, after, FEEDBACK, **M, outcome="unknown") == 3
    assert delta(before, after, FEEDBACK, **M, outcome="correct") == 0
    assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == 0
    np.testing.assert_equal(after.get(ONLINE, **M), before.get(ONLINE, **M))  # NaN == NaN here
    # Feedback is not inference: only the refused ModelInfer shows in requests_total.
    assert delta(before, after, "mnist_serving_requests_total", **M) == 1
    assert delta(before, after, "mnist_serving_requests_total", **M, code="INVALID_ARGUMENT") == 1


# ---------------------------------------------------------------- a dedicated server with a tiny store


def test_expired_ids_come_back_unknown(trained_repository, mnist_data, tmp_path):
    """--feedback-capacity 10 with five requests of 4 images: only the last two requests are still known."""
    server = start_server(trained_repository, tmp_path, "--feedback-capacity", "10", "--accuracy-window", "8")
    x, y = mnist_data.x_test, mnist_data.y_test
    try:
        channel, infer, feedback = stubs(server.url)
        with channel:
            predicted = {f"r{i}": _predict(infer, x[4 * i : 4 * i + 4], request_id=f"r{i}") for i in range(5)}
            before = scrape(server)
            replies = {
                rid: feedback.SendFeedback(feedback_request(rid, y[4 * i : 4 * i + 4]), timeout=10)
                for i, rid in enumerate(predicted)
            }
            after = scrape(server)
    finally:
        assert server.stop() == 0, server.log()
    assert [(r.matched, r.unknown) for r in replies.values()] == [(0, 4)] * 3 + [(4, 0)] * 2
    correct = sum(int((predicted[f"r{i}"] == y[4 * i : 4 * i + 4]).sum()) for i in (3, 4))
    assert delta(before, after, FEEDBACK, **M, outcome="unknown") == 12
    assert delta(before, after, FEEDBACK, **M, outcome="correct") == correct
    assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == 8 - correct
    assert after.get(ONLINE, **M) == correct / 8
    assert math.isnan(before.get(ONLINE, **M))  # no labelled answer yet: NaN, not 0% accurate
