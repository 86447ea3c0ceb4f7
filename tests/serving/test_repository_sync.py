"""The repository's sync in process, with the real ModelVersion behind an injected factory that records each load
and can refuse chosen versions (as a model that fails its checks would): rollback, reload, removal."""

from __future__ import annotations

import shutil

import pytest

from serving.config import ModelSettings, Settings
from serving.discovery import versions_in
from serving.errors import ModelLoadError, ModelLoadFailed
from serving.model_version import ModelVersion
from serving.repository import IndexEntry, ModelRepository


class Factory:
    """The real ModelVersion, counting the loads, refusing the versions in `refuse`."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int, int]] = []  # (model, version, max_batch_size)
        self.refuse: set[int] = set()
        self.made: list[ModelVersion] = []

    def __call__(self, name, version, path, settings, server) -> ModelVersion:
        self.loads.append((name, version, settings.max_batch_size))
        if version in self.refuse:
            raise ModelLoadError(f"version {version} refused by the test")
        mv = ModelVersion(name, version, path, settings, server)
        self.made.append(mv)
        return mv


@pytest.fixture
def repo(trained_repository, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(trained_repository, root)
    for v in (2, 3):
        shutil.copytree(root / "mnist" / "1", root / "mnist" / str(v))
    return root


async def _unload_all(repository: ModelRepository) -> None:
    for mv in repository.versions():
        await mv.unload()


async def test_a_load_with_one_bad_version_rolls_back_what_it_loaded(repo):
    factory = Factory()
    settings = Settings(model_repository=repo, model_control_mode="explicit", model_control_header="x=y",
                        load_model=["mnist"], version_policy="specific:1", verify_on_load=False)  # fmt: skip
    repository = ModelRepository(settings, factory)
    await repository.load_all()
    first = repository.get("mnist")
    factory.refuse = {2}
    try:
        with pytest.raises(ModelLoadFailed, match="version 2: version 2 refused.*still serving versions: 1"):
            await repository.load(
                "mnist", versions_in(repo / "mnist"), ModelSettings.within(settings, version_policy="all")
            )
        assert repository.models["mnist"] == {1: first}  # exactly what it served before
        loaded_then_rolled_back = [mv for mv in factory.made if mv.version in ("2", "3")]
        assert [mv.version for mv in loaded_then_rolled_back] == ["3"]  # loaded newest first
        with pytest.raises(Exception, match="being unloaded"):  # its batcher is closed: it serves nothing
            await loaded_then_rolled_back[0].batcher.infer(None)
        assert ("mnist", 2) in repository.failed
    finally:
        await _unload_all(repository)


async def test_a_rescan_loads_only_what_changed_and_drains_what_left(repo):
    factory = Factory()
    repository = ModelRepository(Settings(model_repository=repo, version_policy="all", verify_on_load=False), factory)
    await repository.load_all()
    try:
        assert sorted(v for _, v, _ in factory.loads) == [1, 2, 3]
        old3 = repository.get("mnist", "3")
        await repository.rescan()  # nothing changed on disk: nothing loads again
        assert len(factory.loads) == 3
        shutil.rmtree(repo / "mnist" / "3")
        await repository.rescan()
        assert sorted(repository.models["mnist"]) == [1, 2] and len(factory.loads) == 3
        with pytest.raises(Exception, match="being unloaded"):
            await old3.batcher.infer(None)
        (repo / "mnist" / "config.pbtxt").write_text("max_batch_size: 16")
        await repository.rescan()  # new settings: every version loaded again with them
        assert sorted(factory.loads[3:]) == [("mnist", 1, 16), ("mnist", 2, 16)]
        assert {mv.settings.max_batch_size for mv in repository.versions()} == {16}
    finally:
        await _unload_all(repository)


async def test_a_version_that_fails_is_not_retried_by_polling_until_it_changes_state(repo):
    factory = Factory()
    factory.refuse = {3}
    repository = ModelRepository(Settings(model_repository=repo, version_policy="all", verify_on_load=False), factory)
    await repository.load_all()
    try:
        assert sorted(repository.models["mnist"]) == [1, 2]
        assert IndexEntry("mnist", "3", "UNAVAILABLE", "version 3 refused by the test") in await repository.index()
        await repository.rescan()
        assert [v for _, v, _ in factory.loads].count(3) == 1  # polling does not hammer a bad version
    finally:
        await _unload_all(repository)
