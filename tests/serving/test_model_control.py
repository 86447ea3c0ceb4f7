"""Model control: the settings it needs, who may use it, and how a load's parameters and config are read."""

from __future__ import annotations

import json
import shutil
import socket

import grpc
import pytest
from server_process import ROOT as REPO_ROOT
from tritonclient.utils import InferenceServerException

from serving.client import load_request, replica_targets
from serving.config import Settings, parse_args
from serving.discovery import scan
from serving.errors import InvalidInput, ModelControlOff, ModelLoadFailed, ModelNotFound, PermissionDenied, StartupError
from serving.model_control import LoadOptions, ModelControl, load_options, write_files
from serving.model_settings import defaults, from_json
from serving.protos import grpc_service_pb2 as pb
from serving.repository import IndexEntry, ModelRepository

HEADER = "x-model-control=s3cret"


def explicit(**kw) -> Settings:
    kw.setdefault("model_repository", "unused")
    return Settings(model_control_mode="explicit", model_control_header=HEADER, **kw)


def test_the_poll_interval_alone_still_means_poll_mode():
    assert Settings(model_poll_interval_s=0.2).model_control_mode == "poll"
    assert Settings(model_control_mode="poll").model_poll_interval_s == 15.0
    assert Settings().model_control_mode == "none"


def test_load_model_is_repeatable_on_the_command_line():
    settings = parse_args(
        ["--model-control-mode", "explicit", "--model-control-header", HEADER, "--load-model", "a", "--load-model", "b"]
    )
    assert settings.load_model == ["a", "b"]


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"model_control_mode": "explicit"}, "model_control_header must be 'name=value'"),
        ({"model_control_mode": "explicit", "model_control_header": "novalue="}, "model_control_header must be"),
        ({"model_control_mode": "explicit", "model_control_header": "grpc-timeout=1"}, "not grpc-*"),
        ({"model_control_mode": "explicit", "model_control_header": HEADER, "workers": 2}, "needs workers 1"),
        ({"model_control_mode": "explicit", "model_control_header": HEADER, "model_poll_interval_s": 1}, "poll"),
        ({"load_model": ["mnist"]}, "need model_control_mode explicit"),
        ({"model_control_header": HEADER}, "need model_control_mode explicit"),
    ],
)
def test_bad_model_control_settings_are_refused(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings(model_repository="unused", **kw)


def test_only_explicit_mode_with_the_header_may_load():
    repository = ModelRepository(Settings(model_repository="unused"))
    with pytest.raises(ModelControlOff, match="model control mode is none"):
        ModelControl(repository, Settings(model_repository="unused")).authorize([("x-model-control", "s3cret")])
    control = ModelControl(repository, explicit())
    control.authorize([("user-agent", "x"), ("x-model-control", "s3cret")])
    for metadata in (None, [], [("x-model-control", "S3CRET")], [("x-model-control-2", "s3cret")]):
        with pytest.raises(PermissionDenied, match="'x-model-control' metadata header"):
            control.authorize(metadata)


def _parameters(values: dict) -> dict[str, pb.ModelRepositoryParameter]:
    kinds = {bytes: "bytes_param", bool: "bool_param", str: "string_param"}
    return {key: pb.ModelRepositoryParameter(**{kinds[type(v)]: v}) for key, v in values.items()}


def test_load_parameters_are_config_and_files():
    options = load_options(_parameters({"config": "{}", "file:1/model.onnx": b"onnx"}))
    assert options.config == "{}" and options.files == {"1/model.onnx": b"onnx"}
    with pytest.raises(InvalidInput, match="needs the 'config' parameter"):
        load_options(_parameters({"file:1/model.onnx": b"onnx"}))
    with pytest.raises(InvalidInput, match="unsupported load parameter 'config' \\(bytes_param\\)"):
        load_options(_parameters({"config": b"{}"}))
    with pytest.raises(InvalidInput, match="unsupported load parameter 'force'"):
        load_options(_parameters({"force": True}))


@pytest.mark.parametrize(
    "path", ["../1/model.onnx", "1/../../etc/passwd", "v1/model.onnx", "1/other.bin", "1", "²/model.onnx"]
)
def test_files_outside_a_version_folder_are_refused(path):
    with pytest.raises(InvalidInput, match="expected 'file:<version>/<model.onnx|metadata.json>'"):
        write_files("mnist", {path: b"x"})


def test_files_land_in_version_folders_of_their_own(tmp_path):
    with pytest.raises(InvalidInput, match=r"version\(s\) \[2\] have no model.onnx"):
        write_files("mnist", {"2/metadata.json": b"{}"})
    root, versions = write_files("mnist", {"3/model.onnx": b"m", "3/metadata.json": b"{}"})
    try:
        assert versions == {3: root / "3"} and (root / "3" / "model.onnx").read_bytes() == b"m"
    finally:
        shutil.rmtree(root)


def test_config_json_sets_this_models_settings():
    base = explicit(max_batch_size=256)
    config = {
        "name": "mnist",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 64,
        "version_policy": {"specific": {"versions": [1, 3]}},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "dynamic_batching": {"max_queue_delay_microseconds": 500},
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [784]}],
    }
    s = from_json("mnist", json.dumps(config), base)
    assert (s.max_batch_size, s.version_policy, s.instance_count, s.max_queue_delay_us) == (64, "specific:1,3", 2, 500)
    assert from_json("mnist", '{"version_policy": {"all": {}}}', base).version_policy == "all"
    assert from_json("mnist", "{}", base) == defaults(base)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("not json", "not a ModelConfig in JSON"),
        ('{"max_batch_sise": 4}', "not a ModelConfig in JSON"),
        ('{"name": "other"}', "names model 'other'"),
        ('{"platform": "tensorrt_plan"}', "onnxruntime_onnx"),
        ('{"max_batch_size": 4096}', "exceeds the server's 256"),
        ('{"version_policy": {"latest": {"num_versions": 0}}}', "num_versions >= 1"),
        ('{"sequence_batching": {}}', "sequence_batching"),
        ('{"input": [{"name": "image", "data_type": "TYPE_FP32", "dims": [28, 28]}]}', "input differs"),
    ],
)
def test_bad_config_json_is_invalid_input(config, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        from_json("mnist", config, explicit(max_batch_size=256))


def test_a_single_model_layout_is_served_under_the_given_name(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"")
    assert scan(tmp_path, "digits") == {"digits": {1: tmp_path / "1"}}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes(b"")
    assert scan(bare, "digits") == {"digits": {1: bare}}
    repo = tmp_path / "repo" / "mnist" / "2"
    repo.mkdir(parents=True)
    (repo / "model.onnx").write_bytes(b"")
    assert scan(tmp_path / "repo", "digits") == {"mnist": {2: repo}}  # a repository keeps its names


def test_load_and_unload_are_off_by_default(triton):
    """The shared server runs in the default mode: tritonclient's calls get FAILED_PRECONDITION, not UNIMPLEMENTED."""
    for call in (lambda: triton.load_model("mnist"), lambda: triton.unload_model("mnist")):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == f"StatusCode.{grpc.StatusCode.FAILED_PRECONDITION.name}"
        assert "--model-control-mode explicit" in err.value.message()
    index = triton.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": "mnist", "version": "1", "state": "READY"}]


def test_replica_targets_are_every_address_of_the_name():
    assert replica_targets("dns:///127.0.0.1:8001") == ["127.0.0.1:8001"]
    assert replica_targets("localhost:8001") == sorted(
        {f"[{a[4][0]}]:8001" if ":" in a[4][0] else f"{a[4][0]}:8001" for a in socket.getaddrinfo("localhost", 8001)},
        key=lambda t: (t.startswith("["), t),
    )
    assert replica_targets("[::1]:8001") == ["[::1]:8001"]
    for bad, fragment in (
        ("dns://10.0.0.10/svc:8001", "DNS server"),
        ("svc", "not dns:///name:port"),
        ("svc:x", "not"),
    ):
        with pytest.raises(ValueError, match=fragment):
            replica_targets(bad)


def test_load_request_carries_config_and_files(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    request = load_request("mnist", "{}", [f"2/model.onnx={tmp_path / 'm.onnx'}"])
    assert request.parameters["config"].string_param == "{}"
    assert request.parameters["file:2/model.onnx"].bytes_param == b"onnx"
    with pytest.raises(ValueError, match="expected <version>/<name>=<local path>"):
        load_request("mnist", "{}", ["2/model.onnx"])


# ---------------------------------------------------------------- in process, with the real model


def _repository(trained_repository, **kw) -> ModelRepository:
    return ModelRepository(explicit(model_repository=trained_repository, data_dir=REPO_ROOT / "data", **kw))


async def test_explicit_start_loads_only_the_named_models(trained_repository):
    with pytest.raises(StartupError, match=r"--load-model: no <model>/<version>/model.onnx .* for \['digits'\]"):
        await _repository(trained_repository, load_model=["digits"]).load_all()
    empty = _repository(trained_repository)
    await empty.load_all()
    assert not empty.ready and await empty.index() == [IndexEntry("mnist", "", "")]
    with pytest.raises(ModelNotFound, match="unknown model 'mnist' \\(models: none\\)"):
        empty.get("mnist")


async def test_a_load_is_all_or_nothing(trained_repository):
    """Version 3 loads, version 2 of the same load fails: 3 is unloaded again and 1 serves as before."""
    repository = _repository(trained_repository, load_model=["mnist"], version_policy="latest:2")
    await repository.load_all()
    control = ModelControl(repository, repository.settings)
    onnx = (trained_repository / "mnist" / "1" / "model.onnx").read_bytes()
    files = {"3/model.onnx": onnx, "2/model.onnx": b"not a model"}
    try:
        with pytest.raises(ModelLoadFailed, match="version 2: cannot load.*still serving versions: 1$"):
            await control.load("mnist", LoadOptions(config="{}", files=files))
        served = sorted(repository.models["mnist"])
        uploads_left = dict(control.uploads)
        await control.load("mnist", LoadOptions(config="{}", files={"3/model.onnx": onnx}))
        after = sorted(repository.models["mnist"])
    finally:
        for mv in repository.versions():
            await mv.unload()
        control.close()
    assert served == [1] and uploads_left == {}
    assert after == [3]  # files are the whole model, as in Triton: version 1 (on disk) is not part of it
    assert await repository.index() == [IndexEntry("mnist", "3", "READY")]
