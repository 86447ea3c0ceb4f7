"""The load generator against real gRPC servers on loopback: counts, percentiles, schedule, accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import NonLoopbackTarget, check_target, find_model, launch
from bench.loadgen import LoadGenerator, Step, build_requests, correct_answers, main
from bench.nocompute_server import CONSTANT_CLASS
from training.data import to_model_input


def _sane(result: dict) -> None:
    lat = result["latency_ms"]
    assert result["measured"] > 0
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_closed_loop_counts_and_percentiles(nocompute, test_set):
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y) as gen:
        r = gen.run(Step(concurrency=2, duration=1.0, warmup=0.2))
    assert r["requests"] > 0 and r["ok"] == r["requests"]
    assert r["errors"] == {}
    assert r["req_per_s"] > 0 and r["img_per_s"] == r["req_per_s"]
    _sane(r)
    assert r["client_cpu_pct"] > 0


def test_accuracy_is_the_constant_answers_hit_rate(nocompute, test_set):
    """The no-compute server always answers class 1: accuracy = share of 1s among exactly the images sent."""
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y) as gen:
        r = gen.run(Step(concurrency=2, duration=60, warmup=0, max_requests=500))
        big = gen.run(Step(concurrency=2, batch=100, dtype="UINT8", duration=60, warmup=0, max_requests=20))
    assert r["ok"] == r["requests"] == r["answered_images"] == 500
    assert r["accuracy"] == pytest.approx(np.mean(y[:500] == CONSTANT_CLASS), abs=1e-5)
    assert (
        big["ok"] == 20
        and big["answered_images"] == 2000
        and big["img_per_s"] == pytest.approx(100 * big["req_per_s"], rel=1e-3)
    )
    assert big["accuracy"] == pytest.approx(np.mean(y[:2000] == CONSTANT_CLASS), abs=1e-5)


def test_correct_answers_decodes_probabilities(test_set):
    from serving.protos import grpc_service_pb2 as pb

    _, y = test_set
    probs = np.eye(10, dtype="<f4")[[3, 1, 4, 1]]
    resp = pb.ModelInferResponse(
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[4, 10])],
        raw_output_contents=[probs.tobytes()],
    ).SerializeToString()
    assert correct_answers(resp, np.array([3, 1, 4, 1])) == 4
    assert correct_answers(resp, np.array([3, 0, 0, 1])) == 2


def test_requests_carry_the_images(test_set):
    from serving.protos import grpc_service_pb2 as pb

    x, y = test_set
    reqs, labels = build_requests(x, y, 256, "UINT8")
    assert len(reqs) == len(x) // 256 and all(len(lab) == 256 for lab in labels)
    second = pb.ModelInferRequest.FromString(reqs[1])
    assert list(second.inputs[0].shape) == [256, 784] and second.inputs[0].datatype == "UINT8"
    assert np.array_equal(np.frombuffer(second.raw_input_contents[0], np.uint8).reshape(256, 784), x[256:512])
    assert [o.name for o in second.outputs] == ["probabilities"]
    fp32 = pb.ModelInferRequest.FromString(build_requests(x, y, 1, "FP32")[0][7])
    assert np.allclose(np.frombuffer(fp32.raw_input_contents[0], "<f4"), x[7] / 255.0)


def test_two_client_processes_merge_their_samples(nocompute, test_set):
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y, client_procs=2) as gen:
        r = gen.run(Step(concurrency=4, duration=1.0, warmup=0.2))
    assert r["errors"] == {} and r["ok"] > 0
    assert len(r["client_cpu_pct_per_proc"]) == 2 and all(c > 0 for c in r["client_cpu_pct_per_proc"])
    assert r["answered_images"] == r["ok"]
    _sane(r)


@pytest.mark.parametrize("procs", [1, 2])
def test_open_loop_sends_rate_times_duration(nocompute, test_set, procs):
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y, client_procs=procs) as gen:
        r = gen.run(Step(mode="open", rate=200, duration=1.0, warmup=0.25))
    assert r["requests"] == 250 and r["ok"] == 250 and r["errors"] == {}
    assert r["measured"] == 200  # the schedule slots after the warm-up
    assert r["answered_images"] == 250
    _sane(r)


def test_open_loop_latency_counts_from_the_schedule(slow_nocompute, test_set):
    """100 requests due within 0.5 s, at most one in flight, each served in >= 20 ms: the last one waits
    >= 2 s - 0.5 s behind its slot. A generator timing from the actual send (coordinated omission)
    would report about 20 ms for every request."""
    x, y = test_set
    with LoadGenerator(slow_nocompute.target, x, y) as gen:
        r = gen.run(Step(mode="open", rate=200, duration=0.5, warmup=0, max_outstanding=1))
    assert r["requests"] == 100 and r["errors"] == {}
    assert r["latency_ms"]["p50"] >= 20
    assert r["latency_ms"]["max"] >= 100 * 20 - 500
    # Each slot's send lag is part of its latency (measured from the same slot): never more than the worst latency.
    # (Its size is this machine's scheduling noise: reported by `make bench`, not asserted here.)
    assert 0 <= r["max_send_lag_ms"] <= r["latency_ms"]["max"]


@pytest.mark.parametrize("target", ["10.0.0.1:8001", "[2001:db8::1]:8001", "0.0.0.0:8001", "192.0.2.7:80"])
def test_non_loopback_targets_are_refused(target, test_set):
    with pytest.raises(NonLoopbackTarget):
        check_target(target)
    with pytest.raises(NonLoopbackTarget):
        LoadGenerator(target, *test_set)
    assert check_target(target, allow_remote=True) == target
    assert main(["--target", target, "--duration", "0.1"]) == 2


@pytest.mark.parametrize(
    "target", ["127.0.0.1:1", "localhost:8001", "[::1]:8001", "127.0.0.2:5", "ipv4:127.0.0.1:1,127.0.0.1:2"]
)
def test_loopback_targets_are_accepted(target):
    assert check_target(target) == target


def test_an_address_list_is_checked_address_by_address():
    with pytest.raises(NonLoopbackTarget):
        check_target("ipv4:127.0.0.1:1,10.0.0.1:2")


def test_malformed_target_is_refused():
    with pytest.raises(ValueError):
        check_target("no-port")


def test_step_validation():
    with pytest.raises(ValueError):
        Step(dtype="FP16")
    with pytest.raises(ValueError):
        Step(mode="open", rate=0)
    with pytest.raises(ValueError):
        Step(concurrency=0)
    with pytest.raises(ValueError):
        Step(window=2)  # in flight per stream: streaming steps only


@pytest.mark.slow
def test_accuracy_against_the_real_server(trained_repository, test_set, tmp_path):
    """Answers from `python -m serving` agree exactly with onnxruntime run in-process on the same images."""
    from bench.inprocess import load_model

    x, y = test_set
    model = load_model(find_model(trained_repository))
    server = launch(
        "real", ["-m", "serving", "--model-repository", str(trained_repository), "--metrics-port", "0"], tmp_path,
        port_flag="--grpc-port",
    )  # fmt: skip
    with server, LoadGenerator(server.target, x, y) as gen:
        one = gen.run(Step(concurrency=2, dtype="UINT8", duration=60, warmup=0, max_requests=300))
        many = gen.run(Step(concurrency=2, batch=50, dtype="FP32", duration=60, warmup=0, max_requests=20))
    expected = model.run(to_model_input(x[:1000])).argmax(1) == y[:1000]
    assert one["errors"] == {} and one["answered_images"] == 300
    assert one["accuracy"] == pytest.approx(expected[:300].mean(), abs=1e-5)
    assert many["errors"] == {} and many["answered_images"] == 1000
    assert many["accuracy"] == pytest.approx(expected.mean(), abs=1e-5)
    assert many["accuracy"] > 0.9


def test_streaming_closed_loop_answers_each_request_once(nocompute, test_set):
    """Over ModelStreamInfer: every request answered once (matched by the id it carries), the images it sent."""
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y) as gen:
        r = gen.run(Step(concurrency=4, duration=60, warmup=0, max_requests=300, stream=True))
    assert r["label"] == "stream c=4 batch=1 FP32"
    assert r["ok"] == r["requests"] == r["answered_images"] == 300 and r["errors"] == {}
    assert r["accuracy"] == pytest.approx(np.mean(y[:300] == CONSTANT_CLASS), abs=1e-5)
    _sane(r)


def test_streams_of_a_window_each(nocompute, test_set):
    """window=1: as many streams as requests in flight, one each, over fewer connections; all answered once."""
    x, y = test_set
    with LoadGenerator(nocompute.target, x, y) as gen:
        r = gen.run(Step(concurrency=6, channels=2, window=1, duration=60, warmup=0, max_requests=120, stream=True))
    assert r["label"] == "stream c=6 window=1 batch=1 FP32"
    assert r["ok"] == r["requests"] == r["answered_images"] == 120 and r["errors"] == {}
    _sane(r)


def test_an_address_list_spreads_calls_over_its_servers(nocompute, slow_nocompute, test_set):
    """ipv4:fast,slow: each channel calls both servers in turn (round robin); pick_first would call only the
    first (fast) one, and no answer would take the slow one's 20 ms."""
    x, y = test_set
    with LoadGenerator(f"ipv4:{nocompute.target},{slow_nocompute.target}", x, y) as gen:
        r = gen.run(Step(concurrency=4, channels=1, duration=60, warmup=0, max_requests=200))
    assert r["ok"] == 200 and r["errors"] == {}
    assert r["latency_ms"]["p90"] >= 20
