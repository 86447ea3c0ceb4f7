"""Per-model settings from the model's folder (config.pbtxt as Triton writes it, or config.json), over the flags."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tritonclient.grpc as tc
from pydantic import ValidationError
from server_process import start_server
from tritonclient.utils import InferenceServerException

from serving.codec import model_config
from serving.config import ModelSettings, Settings
from serving.errors import InvalidInput
from serving.model_settings import from_file, from_json
from serving.repository import IndexEntry, ModelRepository

PBTXT = """
name: "mnist"
max_batch_size: 8
version_policy: { latest: { num_versions: 1 } }
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 250 }
"""


def test_config_pbtxt_and_json_set_what_triton_users_expect(tmp_path):
    base = Settings(model_repository=tmp_path)
    assert from_file(tmp_path, "mnist", base) is None  # no file: the flags
    (tmp_path / "config.pbtxt").write_text(PBTXT)
    settings = from_file(tmp_path, "mnist", base)
    assert (settings.max_batch_size, settings.version_policy, settings.instance_count, settings.max_queue_delay_us) == (
        8, "latest:1", 2, 250,
    )  # fmt: skip
    (tmp_path / "config.pbtxt").unlink()
    (tmp_path / "config.json").write_text('{"max_batch_size": 16, "dynamic_batching": {}}')
    # What the file does not set stays the flags'.
    assert from_file(tmp_path, "mnist", base) == ModelSettings.within(base, max_batch_size=16)
    assert from_file(tmp_path, "mnist", base).version_policy == base.version_policy


@pytest.mark.parametrize(
    ("config", "fields", "server", "fragment"),
    [
        ('{"max_batch_size": -4}', {"max_batch_size": -4}, {},
         "'config' max_batch_size: Input should be greater than or equal to 1"),
        ('{"instance_group": [{"count": 2}]}', {"instance_count": 2}, {"cuda_graphs": True},
         "cuda_graphs needs instance_count 1"),
        ('{"max_batch_size": 64}', {"max_batch_size": 64}, {"max_batch_size": 32},
         "max_batch_size 64 exceeds the server's 32"),
    ],
)  # fmt: skip
def test_a_models_settings_are_validated_where_they_are_made(tmp_path, config, fields, server, fragment):
    """The per-model rules hold for a load's config, a folder's file and the type itself (`fields`: what `config`
    sets, as ModelSettings names it), naming the field."""
    base = Settings(model_repository=tmp_path, **server)
    with pytest.raises(InvalidInput, match=re.escape(fragment)):
        from_json("mnist", config, base)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(InvalidInput, match=r"config.json: .*" + re.escape(fragment)):
        from_file(tmp_path, "mnist", base)
    with pytest.raises(ValidationError):
        ModelSettings.within(base, **fields)


def test_the_flags_obey_the_per_model_rules():
    with pytest.raises(ValidationError, match="cuda_graphs needs instance_count 1"):
        Settings(cuda_graphs=True, instance_count=2)
    with pytest.raises(ValidationError):  # frozen: a version's settings cannot drift from what it loaded with
        ModelSettings.within(Settings()).max_batch_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_size: 4096", "exceeds the server's 1024"),
        ('name: "digits"', "names model 'digits'"),
        ('platform: "tensorflow_savedmodel"', "platform onnxruntime_onnx"),
        ('default_model_filename: "m.onnx"', "sets ['default_model_filename'], not supported"),
        ("optimization { priority: PRIORITY_MAX }", 'has no field named "optimization"'),
        ("max_batch_size: [", ""),  # not text format at all
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file(tmp_path, text, fragment):
    (tmp_path / "config.pbtxt").write_text(text)
    with pytest.raises(InvalidInput, match=r"config.pbtxt: .*" + re.escape(fragment)):
        from_file(tmp_path, "mnist", Settings(model_repository=tmp_path))


@pytest.fixture
def repository_with_config(trained_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained_repository, repo)
    (repo / "mnist" / "config.pbtxt").write_text(PBTXT)
    return repo


async def test_the_repository_loads_a_model_with_its_folders_settings(repository_with_config):
    repository = ModelRepository(Settings(model_repository=repository_with_config, verify_on_load=False))
    await repository.load_all()
    try:
        mv = repository.get("mnist")
        config = model_config(mv)
        assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 250
        assert [g.count for g in config.instance_group] == [2] and len(mv.batcher.thread_ids) == 2
    finally:
        for mv in repository.versions():
            await mv.unload()


async def test_a_bad_config_file_refuses_the_model_with_the_reason_and_a_fixed_one_loads(repository_with_config):
    (repository_with_config / "mnist" / "config.pbtxt").write_text("max_batch_size: 4096")
    repository = ModelRepository(Settings(model_repository=repository_with_config, verify_on_load=False))
    await repository.rescan()
    assert not repository.ready
    (entry,) = await repository.index()
    assert entry.state == "UNAVAILABLE" and "config.pbtxt: 'config' max_batch_size 4096 exceeds" in entry.reason
    (repository_with_config / "mnist" / "config.pbtxt").write_text(PBTXT)
    await repository.rescan()  # poll mode picks the fixed file up
    try:
        assert await repository.index() == [IndexEntry("mnist", "1", "READY")]
    finally:
        for mv in repository.versions():
            await mv.unload()


@pytest.mark.slow
def test_the_server_serves_and_reports_the_folders_settings(repository_with_config, tmp_path):
    server = start_server(repository_with_config, tmp_path)
    try:
        client = tc.InferenceServerClient(server.url)
        config = client.get_model_config("mnist").config
        assert config.max_batch_size == 8 and config.instance_group[0].count == 2
        tensor = tc.InferInput("input", [9, 784], "UINT8")
        tensor.set_data_from_numpy(np.zeros((9, 784), dtype=np.uint8))
        with pytest.raises(
            InferenceServerException, match=r"INVALID_ARGUMENT.*batch of 9 images is over the model.s max_batch_size 8"
        ):
            client.infer("mnist", [tensor])
        client.close()
    finally:
        assert server.stop() == 0, server.log()


def _gauges(model: str, version: str = "1") -> tuple:
    """The version's provider gauge and load time as this process exports them."""
    from prometheus_client import REGISTRY

    from serving.runtime import CPU

    labels = {"model": model, "version": version}
    provider = REGISTRY.get_sample_value("mnist_serving_execution_provider_info", {**labels, "provider": CPU})
    return provider, REGISTRY.get_sample_value("mnist_serving_model_load_seconds", labels)


def _explicit(repo) -> Settings:
    return Settings(
        model_repository=repo, verify_on_load=False, model_control_mode="explicit",
        model_control_header="x-model-control=s3cret", load_model=["mnist"],
    )  # fmt: skip


async def test_a_load_with_new_settings_reloads_the_loaded_version_and_one_without_goes_back_to_the_file(
    repository_with_config,
):
    """As in Triton: loading a loaded model with another config loads it again with that config (the old one
    serves until the new one is ready, then drains); a load without config takes the folder's config.pbtxt."""
    from serving.model_control import LoadOptions, ModelControl

    repository = ModelRepository(_explicit(repository_with_config))
    await repository.load_all()
    control = ModelControl(repository, repository.settings)
    try:
        first = repository.get("mnist")
        await control.load("mnist", LoadOptions(config='{"max_batch_size": 16}'))
        second = repository.get("mnist")
        await control.load("mnist", LoadOptions())
        third = repository.get("mnist")
        await control.load("mnist", LoadOptions())  # nothing changed: nothing reloaded
        fourth = repository.get("mnist")
        gauges_after_reload = _gauges("mnist")
    finally:
        for mv in repository.versions():
            await mv.unload()
        control.close()
    assert [mv.settings.max_batch_size for mv in (first, second, third)] == [8, 16, 8]
    assert gauges_after_reload == (1.0, third.load_seconds)  # the replaced loads did not take the series along
    assert first is not second and second is not third and fourth is third
    assert first.batcher._closed and second.batcher._closed  # the replaced versions were drained and closed


async def test_a_reload_that_fails_keeps_the_loaded_version_with_its_settings(repository_with_config):
    from serving.errors import ModelLoadFailed
    from serving.model_control import LoadOptions, ModelControl

    repository = ModelRepository(_explicit(repository_with_config))
    await repository.load_all()
    control = ModelControl(repository, repository.settings)
    before = repository.get("mnist")
    (repository_with_config / "mnist" / "1" / "model.onnx").write_bytes(b"broken since it was loaded")
    try:
        with pytest.raises(ModelLoadFailed, match="version 1: cannot load.*still serving versions: 1"):
            await control.load("mnist", LoadOptions(config='{"max_batch_size": 16}'))
        after = repository.get("mnist")
    finally:
        for mv in repository.versions():
            await mv.unload()
        control.close()
    assert after is before and after.settings.max_batch_size == 8
    assert repository.settings_of("mnist").max_batch_size == 8


async def test_a_rolled_back_reload_leaves_the_old_version_serving_with_its_series(repository_with_config):
    """Versions 2 and 1 are loaded again with new settings; 2 loads, 1 fails: 2's new load goes again and the old
    one serves on, its gauges set as before (the two loads of a version share their series)."""
    from serving.errors import ModelLoadFailed
    from serving.model_control import LoadOptions, ModelControl

    model_dir = repository_with_config / "mnist"
    shutil.copytree(model_dir / "1", model_dir / "2")
    (model_dir / "config.pbtxt").write_text(PBTXT.replace("num_versions: 1", "num_versions: 2"))
    repository = ModelRepository(_explicit(repository_with_config))
    await repository.load_all()
    control = ModelControl(repository, repository.settings)
    old = dict(repository.models["mnist"])
    (model_dir / "1" / "model.onnx").write_bytes(b"broken since it was loaded")
    try:
        config = '{"max_batch_size": 16, "version_policy": {"latest": {"num_versions": 2}}}'
        with pytest.raises(ModelLoadFailed, match="version 1: cannot load.*still serving versions: 2, 1"):
            await control.load("mnist", LoadOptions(config=config))
        after = dict(repository.models["mnist"])
        gauges = _gauges("mnist", "2")
    finally:
        for mv in repository.versions():
            await mv.unload()
        control.close()
    assert after == old and after[2].settings.max_batch_size == 8
    assert gauges == (1.0, old[2].load_seconds)


async def test_poll_mode_reloads_a_version_when_its_config_file_changes(repository_with_config):
    repository = ModelRepository(Settings(model_repository=repository_with_config, verify_on_load=False))
    await repository.rescan()
    try:
        first = repository.get("mnist")
        (repository_with_config / "mnist" / "config.pbtxt").write_text(
            PBTXT.replace("max_batch_size: 8", "max_batch_size: 32")
        )
        await repository.rescan()
        second = repository.get("mnist")
        await repository.rescan()
        third = repository.get("mnist")
    finally:
        for mv in repository.versions():
            await mv.unload()
    assert (first.settings.max_batch_size, second.settings.max_batch_size) == (8, 32) and third is second
