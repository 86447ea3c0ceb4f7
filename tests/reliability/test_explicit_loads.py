"""Explicit model control over gRPC with an unmodified tritonclient: load under load, refusals, unload, index."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import CLIENT_OPTIONS, Outcome, checked_stream, infer_ok, metric_value, report, shifted_model, until
from server_process import start_server
from tritonclient.utils import InferenceServerException

from bench.common import ChildServer, free_port, serving_cmd
from bench.metrics_text import Snapshot
from serving.client import main
from serving.protos import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

HEADER = ("x-model-control", "s3cret")
EXPLICIT = (
    "--model-control-mode", "explicit", "--load-model", "mnist", "--version-policy", "latest:1",
    "--model-control-header", f"{HEADER[0]}={HEADER[1]}",
)  # fmt: skip
CONFIG = json.dumps({"name": "mnist", "version_policy": {"latest": {"num_versions": 1}}})
STREAMS = 4
PROVIDER_INFO = "mnist_serving_execution_provider_info"


def _refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value


def _health(url: str, name: str) -> str:
    with grpc.insecure_channel(url) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_load_refuse_unload_and_reload_under_load(repository, tmp_path, reference):
    v1 = repository / "mnist" / "1"
    good = {
        "file:2/model.onnx": (v1 / "model.onnx").read_bytes(),
        "file:2/metadata.json": (v1 / "metadata.json").read_bytes(),
    }
    inaccurate = {
        "file:3/model.onnx": shifted_model(v1 / "model.onnx"),
        "file:3/metadata.json": good["file:2/metadata.json"],
    }
    corrupt = {"file:4/model.onnx": b"this is not an onnx model"}
    server = start_server(repository, tmp_path, *EXPLICIT)
    triton = tc.InferenceServerClient(server.url)
    allowed = dict([HEADER])
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    failures = lambda: metric_value(server.metrics(), "mnist_serving_model_load_failures_total", model="mnist")  # noqa: E731
    try:
        async with grpc.aio.insecure_channel(server.url, options=CLIENT_OPTIONS) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            tasks = [
                asyncio.create_task(checked_stream(stub, reference, i, STREAMS, outcomes, stop, max_images=16))
                for i in range(STREAMS)
            ]
            await until(lambda: sum(o.version == "1" for o in outcomes) >= 20, "version 1 under load", server)

            # Refused before anything is read: no header, a wrong value, files without config.
            no_header = _refused(lambda: triton.load_model("mnist", config=CONFIG, files=good))
            wrong = _refused(lambda: triton.unload_model("mnist", headers={HEADER[0]: "guess"}))
            no_config = _refused(lambda: triton.load_model("mnist", headers=allowed, files=good))

            # A new version, sent as files, takes over under load.
            await asyncio.to_thread(triton.load_model, "mnist", headers=allowed, config=CONFIG, files=good)
            loaded_at = time.monotonic()
            await until(lambda: sum(o.sent > loaded_at for o in outcomes) >= 20, "version 2 under load", server)

            # A model that fails the accuracy check, and one that is not a model: refused, version 2 serves on.
            bad = [
                await asyncio.to_thread(
                    _refused, lambda f=f: triton.load_model("mnist", headers=allowed, config=CONFIG, files=f)
                )
                for f in (inaccurate, corrupt)
            ]
            refused_at = time.monotonic()
            await until(
                lambda: sum(o.sent > refused_at for o in outcomes) >= 20, "version 2 after the refusals", server
            )
            index = await asyncio.to_thread(triton.get_model_repository_index, as_json=True)
            health_loaded = _health(server.url, "mnist")

            # Unload under load: queued requests are answered, then NOT_FOUND.
            unload_started = time.monotonic()
            await asyncio.to_thread(triton.unload_model, "mnist", headers=allowed)
            unloaded_at = time.monotonic()
            await until(lambda: sum(o.sent > unloaded_at for o in outcomes) >= 5, "requests after the unload", server)
            stop.set()
            await asyncio.gather(*tasks)
        index_after = triton.get_model_repository_index(as_json=True)
        health_unloaded = _health(server.url, "mnist")
        metrics_unloaded = server.metrics()
        load_failures = failures()

        # Loaded again from the repository (no files): version 1 serves.
        triton.load_model("mnist", headers=allowed)
        probs, version = infer_ok(server, reference.images[:8])
    finally:
        stop.set()
        triton.close()
        code = server.stop()
    log = server.log()

    before_unload = [o for o in outcomes if o.done < unload_started]
    result = {
        "requests_before_unload": len(before_unload),
        "failed_before_unload": sum(not (o.code == "OK" and o.correct) for o in before_unload),
        "answered_by": {v: sum(o.version == v for o in outcomes) for v in ("1", "2")},
        "not_found_after_unload": sum(o.code == "NOT_FOUND" for o in outcomes),
    }
    report("model_control", result)

    assert code == 0, log
    assert no_header.status() == "StatusCode.PERMISSION_DENIED" and "x-model-control" in no_header.message()
    assert wrong.status() == "StatusCode.PERMISSION_DENIED"
    assert no_config.status() == "StatusCode.INVALID_ARGUMENT" and "'config'" in no_config.message()
    assert result["failed_before_unload"] == 0, [o for o in before_unload if o.code != "OK" or not o.correct][:5]
    assert {o.version for o in outcomes if o.sent > loaded_at and o.done < unload_started} == {"2"}
    assert [e.status() for e in bad] == ["StatusCode.FAILED_PRECONDITION"] * 2
    assert "below the recorded test_accuracy" in bad[0].message() and "still serving versions: 2" in bad[0].message()
    assert "cannot load" in bad[1].message() and "still serving versions: 2" in bad[1].message()
    assert load_failures == 2
    states = {(m["name"], m.get("version", ""), m.get("state", "")) for m in index["models"]}
    assert ("mnist", "2", "READY") in states
    # The index shows the latest load's refusal with its reason (a load forgets the refusals before it).
    assert states == {("mnist", "2", "READY"), ("mnist", "4", "UNAVAILABLE")}
    assert "cannot load" in next(m["reason"] for m in index["models"] if m.get("version") == "4")
    assert health_loaded == "SERVING" and health_unloaded == "NOT_SERVING"
    # During the unload: answers (queued work drained) or NOT_FOUND, nothing else; after it only NOT_FOUND.
    assert {o.code for o in outcomes} <= {"OK", "NOT_FOUND"}
    assert {o.code for o in outcomes if o.sent > unloaded_at} == {"NOT_FOUND"}
    assert all(o.correct for o in outcomes if o.code == "OK")
    assert index_after["models"] == [{"name": "mnist", "state": "UNAVAILABLE", "reason": "unloaded"}]
    provider_series = Snapshot(metrics_unloaded).series(PROVIDER_INFO)
    assert not any(labels["version"] == "2" for labels, _ in provider_series), provider_series
    assert version == "1" and reference.check(0, 8, probs)
    assert "unloading model mnist version 2 (RepositoryModelUnload)" in log


def test_an_unloaded_model_is_not_found_and_reloads(repository, tmp_path, reference):
    """Unload then infer gets NOT_FOUND with the models left; a load of an unknown model is NOT_FOUND too."""
    server = start_server(repository, tmp_path, *EXPLICIT)
    triton = tc.InferenceServerClient(server.url)
    try:
        triton.unload_model("mnist", headers=dict([HEADER]))
        with pytest.raises(grpc.RpcError) as gone:
            infer_ok(server, reference.images[:1])
        unknown = _refused(lambda: triton.load_model("digits", headers=dict([HEADER])))
        ready = triton.is_server_ready()
    finally:
        triton.close()
        code = server.stop()
    assert code == 0, server.log()
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert gone.value.details() == "unknown model 'mnist' (models: none)"
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert not ready


# ---------------------------------------------------------------- every replica behind one DNS name


class _V6Server(ChildServer):
    """A server child bound to ::1 (ChildServer's own target is 127.0.0.1)."""

    @property
    def target(self) -> str:
        return f"[::1]:{self.port}"


def _replica_name(port: int, monkeypatch) -> str:
    """A name resolving to both 127.0.0.1 and ::1, as a headless Service resolves to its pods. `localhost` where it
    does (many /etc/hosts list both); else a made-up name whose answer is supplied in this process's resolver, the
    one stand-in here: the servers, the connections and the calls are real."""
    if {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)} >= {"127.0.0.1", "::1"}:
        return "localhost"
    real = socket.getaddrinfo

    def resolve(host, *args, **kw):
        if host != "replicas.test":
            return real(host, *args, **kw)
        return real("127.0.0.1", *args, **kw) + real("::1", *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return "replicas.test"


def test_all_replicas_reaches_every_address_of_the_name(repository, tmp_path, reference, capsys, monkeypatch):
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback: two replicas on one port need 127.0.0.1 and ::1")
    port = free_port()
    flags = ("--model-control-mode", "explicit", "--model-control-header", f"{HEADER[0]}={HEADER[1]}")
    children = [
        cls("serving", serving_cmd(repository, port, 0, "--host", host, *flags), port, tmp_path / f"{name}.log")
        for cls, host, name in ((ChildServer, "127.0.0.1", "v4"), (_V6Server, "::1", "v6"))
    ]
    name = _replica_name(port, monkeypatch)
    target = f"dns:///{name}:{port}"
    try:
        for child in children:
            child.start()
        for child in children:
            child.wait_serving(60)
        assert main(["unload", "--all-replicas", target, "--header", "x-model-control=guess"]) == 2
        refused = capsys.readouterr().out
        assert main(["load", "--all-replicas", target, "--header", f"{HEADER[0]}={HEADER[1]}"]) == 0
        loaded = capsys.readouterr().out
        answers = [infer_ok(_Target(child.target), reference.images[:4]) for child in children]
        assert main(["unload", "--all-replicas", target, "--header", f"{HEADER[0]}={HEADER[1]}"]) == 0
        unloaded = capsys.readouterr().out
        assert main(["index", "--all-replicas", target]) == 0
        index = capsys.readouterr().out
    finally:
        for child in children:
            child.stop()
    replicas = [f"127.0.0.1:{port}", f"[::1]:{port}"]
    assert [line.split(": ")[0] for line in loaded.splitlines()[:2]] == replicas
    assert loaded.splitlines()[2] == f"2 of 2 replicas behind {target} OK"
    assert all(f"{r}: load mnist: OK" in loaded for r in replicas)
    assert refused.count("error: PERMISSION_DENIED") == 2 and "0 of 2 replicas" in refused
    assert all(version == "1" and reference.check(0, 4, probs) for probs, version in answers)
    assert all(f"{r}: unload mnist: OK" in unloaded for r in replicas)
    assert all(f"{r}: index: mnist/- UNAVAILABLE" in index for r in replicas), index


@dataclass
class _Target:
    url: str
