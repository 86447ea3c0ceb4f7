"""Ground truth and online accuracy: signed receipts, duplicate detection, the window, exact numbers on /metrics."""

from __future__ import annotations

import base64
import math
import time

import grpc
import numpy as np
import pytest
from metrics_helpers import delta, scrape, stubs
from server_process import start_server

from serving.client import feedback_request, infer_request, probabilities, receipt_of
from serving.errors import InvalidReceipt
from serving.feedback import ReceiptLedger
from serving.protos import feedback_pb2
from serving.receipts import ReceiptKey
from serving.telemetry import AccuracyWindow

M = {"model": "mnist", "version": "1"}
UNTRUSTED = {"model": "", "version": ""}  # refused receipts whose content cannot be trusted
FEEDBACK = "mnist_serving_feedback_total"
ONLINE = "mnist_serving_online_accuracy"
# The session server keeps the default --accuracy-window: one request of this many labels fills it.
WINDOW = 1000
KEY = b"k" * 32


# ---------------------------------------------------------------- units: receipts


def _refusal(call) -> str:
    with pytest.raises(InvalidReceipt) as err:
        call()
    return err.value.outcome


@pytest.mark.parametrize("n", [1, 2, 7, 1024])
def test_receipt_round_trips_model_version_classes_and_time(n):
    key = ReceiptKey(KEY, max_age_s=60)
    classes = np.random.default_rng(n).integers(0, 10, n)
    token = key.issue("mnist", "12", classes, now=1_700_000_000.9)
    assert token.isascii() and "=" not in token and len(token) < 64 + n  # compact: two classes per byte
    receipt = ReceiptKey(KEY, max_age_s=60).verify(token, now=1_700_000_030)  # another process, same key
    assert (receipt.model, receipt.version, receipt.issued) == ("mnist", "12", 1_700_000_000)
    np.testing.assert_array_equal(receipt.classes, classes)
    assert key.issue("mnist", "12", classes, now=1_700_000_000) != token  # a nonce: equal answers differ


def test_tampered_foreign_expired_and_garbage_receipts_are_refused():
    key = ReceiptKey(KEY, max_age_s=60)
    token = key.issue("mnist", "1", np.array([3, 1, 4]), now=1000)
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    refused = {}
    for name, at in {"class": -17, "time": 6, "tag": -1, "model name": 19}.items():
        altered = raw.copy()
        altered[at] ^= 0x01
        refused[name] = _refusal(lambda a=altered: key.verify(base64.urlsafe_b64encode(a).decode(), now=1000))
    refused["foreign key"] = _refusal(lambda: ReceiptKey(b"x" * 32, 60).verify(token, now=1000))
    refused["expired"] = _refusal(lambda: key.verify(token, now=1061))
    refused["truncated"] = _refusal(lambda: key.verify(token[:20], now=1000))
    refused["not base64"] = _refusal(lambda: key.verify("a", now=1000))
    refused["huge"] = _refusal(lambda: key.verify("A" * 100_000, now=1000))
    assert refused == {
        "class": "invalid",
        "time": "invalid",
        "tag": "invalid",
        "model name": "invalid",
        "foreign key": "foreign_key",
        "expired": "expired",
        "truncated": "invalid",
        "not base64": "invalid",
        "huge": "invalid",
    }
    assert key.verify(token, now=1060).classes.tolist() == [3, 1, 4]  # the untouched one is fine up to max age


def test_short_keys_are_refused():
    with pytest.raises(ValueError):
        ReceiptKey(b"short", 60)


# ---------------------------------------------------------------- units: duplicate detection


def _receipt(key: ReceiptKey, n: int, issued: int):
    return key.verify(key.issue("mnist", "1", np.zeros(n, dtype=np.int64), now=issued), now=issued)


def test_ledger_counts_each_label_of_a_receipt_once():
    key, ledger = ReceiptKey(KEY, 100), ReceiptLedger(capacity=10, max_age_s=100)
    a, b = _receipt(key, 4, 0), _receipt(key, 4, 0)
    assert ledger.claim(a, [0, 1], now=0) == [True, True]
    assert ledger.claim(a, [1, 2, 2], now=1) == [False, True, False]  # also a repeat inside one request
    assert ledger.claim(b, [1], now=1) == [True]  # another receipt, same content: its own labels
    assert ledger.claim(a, [0, 1, 2, 3], now=2) == [False, False, False, True]


def test_ledger_forgets_expired_receipts_and_refuses_what_it_had_to_forget():
    key, ledger = ReceiptKey(KEY, 100), ReceiptLedger(capacity=3, max_age_s=100)
    receipts = [_receipt(key, 1, issued) for issued in range(10)]
    for r in receipts[:3]:
        ledger.claim(r, [0], now=10)
    assert len(ledger) == 3
    ledger.claim(receipts[3], [0], now=10)  # over capacity: the oldest (issued 0) is forgotten...
    assert (len(ledger), ledger.floor) == (3, 0)
    with pytest.raises(InvalidReceipt) as err:  # ...so it is refused, never counted twice
        ledger.claim(receipts[0], [0], now=10)
    assert err.value.outcome == "expired"
    assert ledger.claim(receipts[1], [0], now=10) == [False]  # still remembered
    ledger.claim(receipts[9], [0], now=103)  # issued 0-2 are past max age: dropped for free
    assert len(ledger) == 2


def test_labels_for_a_version_unloaded_since_are_still_counted():
    """Late feedback after a hot-swap: the version that answered is gone, its counters still get the labels."""
    from prometheus_client import REGISTRY

    from serving.feedback import Feedback

    key = ReceiptKey(KEY, 100)
    feedback = Feedback(key, ReceiptLedger(10, 100), loaded=lambda model, version: None)
    token = key.issue("gone-model", "7", np.array([1, 2, 3]))

    def counted(outcome: str) -> float:
        labels = {"model": "gone-model", "version": "7", "outcome": outcome}
        return REGISTRY.get_sample_value("mnist_serving_feedback_total", labels) or 0.0

    before = {o: counted(o) for o in ("correct", "incorrect", "duplicate")}
    result = feedback.score(token, [0, 1, 2, 2], [1, 2, 9, 9])
    assert (result.matched, result.correct, result.duplicate) == (3, 2, 1)
    assert {o: counted(o) - before[o] for o in before} == {"correct": 2, "incorrect": 1, "duplicate": 1}


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


def _answer(infer, images: np.ndarray, **kw) -> tuple[np.ndarray, str]:
    response = infer.ModelInfer(infer_request(images, "mnist", **kw), timeout=30)
    return probabilities(response).argmax(axis=1), receipt_of(response)


def _wrong(predicted: np.ndarray) -> np.ndarray:
    """Labels that are certainly wrong for these predictions."""
    return (predicted + 1) % 10


def test_labels_parameter_gives_the_exact_online_accuracy(server, mnist_data):
    x, y = mnist_data.x_test[:WINDOW], mnist_data.y_test[:WINDOW]
    channel, infer, _ = stubs(server.url)
    with channel:
        predicted, _ = _answer(infer, x)  # no labels: scored nowhere
        labels = y.copy()
        labels[:100] = _wrong(predicted[:100])  # 100 known mistakes on top of the model's own
        correct = int((predicted == labels).sum())
        before = scrape(server)
        request = infer_request(x, "mnist")
        request.parameters["labels"].string_param = ",".join(map(str, labels.tolist()))
        response = infer.ModelInfer(request, timeout=30)
        assert (probabilities(response).argmax(axis=1) == predicted).all()
        assert receipt_of(response) == ""  # scored already: no receipt to score it twice
        after = scrape(server)

        assert delta(before, after, FEEDBACK, **M, outcome="correct") == correct
        assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == WINDOW - correct
        assert after.get(ONLINE, **M) == correct / WINDOW  # the window holds exactly these answers

        # `label` (int64) for a batch of 1
        single = infer_request(x[:1], "mnist")
        single.parameters["label"].int64_param = int(_wrong(predicted[:1])[0])
        infer.ModelInfer(single, timeout=30)
        last = scrape(server)
    assert delta(after, last, FEEDBACK, **M, outcome="incorrect") == 1
    assert delta(after, last, FEEDBACK, **M, outcome="correct") == 0
    assert last.get(ONLINE, **M) == (correct - int(predicted[0] == labels[0])) / WINDOW  # oldest answer left


def test_feedback_with_a_receipt_gives_the_exact_online_accuracy_once(server, mnist_data):
    x, y = mnist_data.x_test[1000 : 1000 + WINDOW], mnist_data.y_test[1000 : 1000 + WINDOW]
    channel, infer, feedback = stubs(server.url)
    with channel:
        predicted, receipt = _answer(infer, x)
        labels = y.copy()
        labels[:250] = _wrong(predicted[:250])
        correct = int((predicted == labels).sum())
        before = scrape(server)
        # in two parts, in any order, the way labels trickle in
        first = feedback.SendFeedback(feedback_request(receipt, labels[600:], range(600, WINDOW)), timeout=30)
        second = feedback.SendFeedback(feedback_request(receipt, labels[:600]), timeout=30)
        retry = feedback.SendFeedback(feedback_request(receipt, labels[:10]), timeout=30)  # e.g. a client retry
        after = scrape(server)
    assert first.matched + second.matched == WINDOW and first.correct + second.correct == correct
    assert (first.duplicate, second.duplicate, retry.matched, retry.duplicate) == (0, 0, 0, 10)
    assert delta(before, after, FEEDBACK, **M, outcome="correct") == correct
    assert delta(before, after, FEEDBACK, **M, outcome="incorrect") == WINDOW - correct
    assert delta(before, after, FEEDBACK, **M, outcome="duplicate") == 10
    assert after.get(ONLINE, **M) == correct / WINDOW


def test_bad_receipts_and_labels_are_refused_and_counted_never_scored(server, mnist_data):
    channel, infer, feedback = stubs(server.url)
    with channel:
        _, receipt = _answer(infer, mnist_data.x_test[:3])
        foreign = ReceiptKey(b"f" * 32, 60).issue("mnist", "1", np.array([1, 2, 3]))
        tampered = receipt[:-8] + ("A" if receipt[-8] != "A" else "B") + receipt[-7:]
        before = scrape(server)
        refused = {
            "tampered": feedback_request(tampered, [1]),
            "foreign key": feedback_request(foreign, [1, 2]),
            "index outside": feedback_request(receipt, [1, 2, 3, 4]),
            "other model": feedback_pb2.FeedbackRequest(
                receipt=receipt, model_name="resnet", labels=[feedback_pb2.Label(index=0, label=1)]
            ),
            "label 10": feedback_request(receipt, [10]),
            "label -1": feedback_request(receipt, [-1]),
            "no receipt": feedback_request("", [1]),
            "no labels": feedback_request(receipt, []),
        }
        codes = {}
        for name, request in refused.items():
            with pytest.raises(grpc.RpcError) as err:
                feedback.SendFeedback(request, timeout=10)
            codes[name] = err.value.code()
        bad = infer_request(mnist_data.x_test[:3], "mnist")
        bad.parameters["labels"].string_param = "1,2,11"
        with pytest.raises(grpc.RpcError) as err:
            infer.ModelInfer(bad, timeout=10)
        codes["labels parameter 11"] = err.value.code()
        after = scrape(server)
    assert codes == dict.fromkeys(codes, grpc.StatusCode.INVALID_ARGUMENT)
    assert delta(before, after, FEEDBACK, **UNTRUSTED, outcome="invalid") == 1
    assert delta(before, after, FEEDBACK, **UNTRUSTED, outcome="foreign_key") == 2
    assert delta(before, after, FEEDBACK, **M, outcome="invalid") == 4 + 1  # index outside, other model
    for outcome in ("correct", "incorrect", "duplicate"):
        assert delta(before, after, FEEDBACK, **M, outcome=outcome) == 0, outcome
    np.testing.assert_equal(after.get(ONLINE, **M), before.get(ONLINE, **M))  # NaN == NaN here
    # Feedback is not inference: only the refused ModelInfer shows in requests_total.
    assert delta(before, after, "mnist_serving_requests_total", **M) == 1
    assert delta(before, after, "mnist_serving_requests_total", **M, code="INVALID_ARGUMENT") == 1


# ---------------------------------------------------------------- dedicated servers: workers, replicas, expiry


def _ready_workers(server) -> int:
    """Worker processes that logged `ready:` (the log line's third field is the pid)."""
    return len({line.split()[3] for line in server.log().splitlines() if " ready: " in line})


def test_workers_score_each_others_receipts_on_fresh_connections(trained_repository, mnist_data, tmp_path):
    """--workers 2 without a key file: each fresh connection lands on either worker; every label is matched."""
    server = start_server(trained_repository, tmp_path, "--workers", "2")
    x, y = mnist_data.x_test, mnist_data.y_test
    replies = []
    try:
        deadline = time.monotonic() + 60
        while _ready_workers(server) < 2 and time.monotonic() < deadline:  # health answered for one of them
            time.sleep(0.1)
        for i in range(24):
            channel, infer, _ = stubs(server.url, own_connection=True)
            with channel:
                _, receipt = _answer(infer, x[i : i + 3])
            channel, _, feedback = stubs(server.url, own_connection=True)
            with channel:
                replies.append(feedback.SendFeedback(feedback_request(receipt, y[i : i + 3]), timeout=10))
        workers = _ready_workers(server)
    finally:
        assert server.stop() == 0, server.log()
    assert workers == 2, server.log()
    assert [r.matched for r in replies] == [3] * 24


def test_replicas_with_one_key_file_score_each_others_receipts(trained_repository, mnist_data, tmp_path):
    """Two server processes (two replicas) with the same key; a third with another key refuses their receipts."""
    key = tmp_path / "receipt.key"
    key.write_bytes(bytes(range(32)))
    other = tmp_path / "other.key"
    other.write_bytes(bytes(range(1, 33)))
    a = start_server(trained_repository, tmp_path, "--receipt-key-file", str(key))
    b = start_server(trained_repository, tmp_path, "--receipt-key-file", str(key), "--receipt-max-age-s", "2")
    c = start_server(trained_repository, tmp_path, env={"SERVING_RECEIPT_KEY_FILE": str(other)})
    x, y = mnist_data.x_test[:8], mnist_data.y_test[:8]
    try:
        (ca, infer_a, feedback_a), (cb, infer_b, feedback_b), (cc, _, feedback_c) = (stubs(s.url) for s in (a, b, c))
        with ca, cb, cc:
            predicted_a, receipt_a = _answer(infer_a, x)
            predicted_b, receipt_b = _answer(infer_b, x)
            on_b = feedback_b.SendFeedback(feedback_request(receipt_a, y), timeout=10)
            on_a = feedback_a.SendFeedback(feedback_request(receipt_b, y), timeout=10)
            refused = {}
            with pytest.raises(grpc.RpcError) as err:
                feedback_c.SendFeedback(feedback_request(receipt_a, y), timeout=10)
            refused["c: foreign key"] = err.value.code()
            time.sleep(3.5)  # b accepts receipts up to 2 s old
            with pytest.raises(grpc.RpcError) as err:
                feedback_b.SendFeedback(feedback_request(receipt_b, y), timeout=10)
            refused["b: expired"] = err.value.code()
            metrics_b, metrics_c = scrape(b), scrape(c)
    finally:
        for s in (a, b, c):
            assert s.stop() == 0, s.log()
    assert (on_b.matched, on_b.correct) == (8, int((predicted_a == y).sum()))
    assert (on_a.matched, on_a.correct) == (8, int((predicted_b == y).sum()))
    assert refused == dict.fromkeys(refused, grpc.StatusCode.INVALID_ARGUMENT)
    assert metrics_c.get(FEEDBACK, **UNTRUSTED, outcome="foreign_key") == 8
    assert metrics_b.get(FEEDBACK, **M, outcome="expired") == 8
    assert metrics_b.get(FEEDBACK, **M, outcome="correct") == int((predicted_a == y).sum())  # a's receipt
