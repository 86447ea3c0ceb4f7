"""The model registry: which versions of which models are loaded, lookups for the request path, and the one sync
(start-up, polling, explicit loads and unloads) that loads what the repository and the version policies want and
unloads the rest, all or nothing for an explicit load. What is on disk is serving.discovery's; one version is
serving.model_version's (the factory a test may replace)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving import model_settings, telemetry
from serving.config import ModelSettings, Settings
from serving.discovery import is_version, policy_candidates, scan
from serving.errors import InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, StartupError
from serving.model_version import ModelVersion

log = logging.getLogger(__name__)

# Loads one version: (model name, version, its folder, its settings, the server's) -> a ModelVersion (ModelLoadError
# when it cannot).
VersionFactory = Callable[[str, int, Path, ModelSettings, Settings], ModelVersion]


class _Keep:
    """settings_of's default: the settings a model has now."""


KEEP = _Keep()


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of RepositoryIndex: a model version (or a model without one) and its state."""

    name: str
    version: str
    state: str  # READY, LOADING, UNAVAILABLE, or "" for a model on disk that was never asked for
    reason: str = ""


class ModelRepository:
    """The loaded versions of every model; lookups for the request path; reloads for hot-swap."""

    def __init__(self, settings: Settings, version_factory: VersionFactory = ModelVersion) -> None:
        self.settings = settings
        self.version_factory = version_factory
        self.root = settings.model_repository
        self.defaults = model_settings.defaults(settings)  # a model's settings when only the flags set them
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.failed: dict[tuple[str, int], str] = {}
        # Explicit model control: settings given with a model's load, models being loaded, models unloaded.
        self.given: dict[str, ModelSettings] = {}
        self.bad_config: set[str] = set()  # models whose config.pbtxt / config.json was refused
        self.loading: set[str] = set()
        self.unloaded: set[str] = set()
        self.started = False  # the start-up load is over: an unknown model is NOT_FOUND, not "not loaded yet"
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return any(self.models.values())

    def loaded(self, name: str, version: str) -> ModelVersion | None:
        """The loaded version `version` of `name`, or None (no error: for late feedback)."""
        versions = self.models.get(name, {})
        return versions.get(int(version)) if is_version(version) else None

    def scorer(self, name: str, version: str):
        """The telemetry that scores late labels for a loaded version, or None (feedback for the unloaded)."""
        mv = self.loaded(name, version)
        return None if mv is None else mv.telemetry

    def versions(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    def get(self, name: str, version: str = "") -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            if name in self.loading:
                raise ModelNotReady(f"model '{name}' is being loaded")
            if not self.started and self.root.joinpath(name).is_dir():
                raise ModelNotReady(f"model '{name}' is not loaded yet")
            raise ModelNotFound(f"unknown model '{name}' (models: {known})")
        if not version:
            return versions[max(versions)]
        if not is_version(version) or int(version) not in versions:
            have = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {have})")
        return versions[int(version)]

    def on_disk(self) -> dict[str, dict[int, Path]]:
        """The models and versions in the repository now (see scan)."""
        return scan(self.root, self.settings.model_name) if self.root.is_dir() else {}

    def settings_of(self, name: str, given: ModelSettings | None | _Keep = KEEP) -> ModelSettings:
        """The settings `name`'s versions load with: `given` (with a load); None: its folder's config.pbtxt /
        config.json over the server's flags, else the flags; KEEP: what it has (those given with its last explicit
        load, else the folder's). InvalidInput for a bad file."""
        if isinstance(given, _Keep):
            given = self.given.get(name)
        if given is not None:
            return given
        return model_settings.from_file(self._model_dir(name), name, self.settings) or self.defaults

    def _model_dir(self, name: str) -> Path:
        """A model's folder: `<repository>/<name>`, or the repository itself when it is one model's folder."""
        folder = self.root / name
        return self.root if name == self.settings.model_name and not folder.is_dir() else folder

    async def load_all(self) -> None:
        """Start-up load: every version on disk (explicit mode: of the --load-model models only); fails only if
        nothing at all can be served, or (explicit mode) a model asked for is missing or cannot be served."""
        if not self.root.is_dir():
            raise StartupError(f"model repository '{self.root}' does not exist (train first: make train)")
        found = self.on_disk()
        if self.settings.model_control_mode == "explicit":
            await self._load_named(found, self.settings.load_model)
            return
        if not found:
            raise StartupError(f"model repository '{self.root}' has no <model>/<version>/model.onnx")
        await self._sync(found)
        if not self.ready:
            raise StartupError(f"no model version in '{self.root}' could be loaded: {self.failed}")
        self.started = True

    async def _load_named(self, found: dict[str, dict[int, Path]], names: list[str]) -> None:
        wanted = set(found) if "*" in names else set(names)
        missing = sorted(wanted - set(found))
        if missing:
            raise StartupError(f"--load-model: no <model>/<version>/model.onnx in '{self.root}' for {missing}")
        await self._sync({name: found[name] for name in wanted}, scope=wanted)
        not_served = sorted(wanted - set(self.models))
        if not_served:
            raise StartupError(f"--load-model: no version of {not_served} could be loaded: {self.failed}")
        self.started = True

    async def rescan(self) -> None:
        """Load versions that appeared, unload versions that disappeared (hot-swap)."""
        if self.root.is_dir():
            await self._sync(self.on_disk())

    async def load(self, name: str, versions: dict[int, Path], settings: ModelSettings | None = None) -> None:
        """Explicit load of one model from `versions` (its folders on disk, or files sent with the load), with
        `settings` (None: its folder's config file, else the flags): new versions load and are verified as at
        start-up, then replace what the version policy no longer wants (drained first). All or nothing: if a
        version fails, every version loaded by this call is unloaded again, the model serves what it served before,
        and ModelLoadFailed."""
        chosen = self.settings_of(name, settings)
        if not policy_candidates(versions, chosen)[0]:
            have = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise ModelLoadFailed(
                f"model '{name}': no version to serve under policy {chosen.version_policy} (versions: {have})"
            )
        self.loading.add(name)
        try:
            # An explicit load retries versions that failed before (the caller may have fixed them).
            self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
            failures = await self._sync({name: versions}, scope={name}, atomic=True, settings={name: settings})
        finally:
            self.loading.discard(name)
        if failures:
            serving = ", ".join(str(v) for v in sorted(self.models.get(name, {}), reverse=True)) or "none"
            why = "; ".join(f"version {v}: {reason}" for (_, v), reason in sorted(failures.items()))
            raise ModelLoadFailed(f"model '{name}' was not loaded ({why}); still serving versions: {serving}")
        self.unloaded.discard(name)

    async def unload(self, name: str) -> None:
        """Explicit unload: new requests for the model get NOT_FOUND at once; what is queued is answered first."""
        async with self._lock:
            loaded = self.models.pop(name, None)
            if loaded is None and name not in self.on_disk() and name not in self.unloaded:
                raise ModelNotFound(f"unknown model '{name}' (models: {', '.join(sorted(self.models)) or 'none'})")
            for version, mv in sorted((loaded or {}).items()):
                log.info("unloading model %s version %d (RepositoryModelUnload)", name, version)
                await mv.unload()
            self.given.pop(name, None)
            self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
            self.unloaded.add(name)

    async def index(self) -> list[IndexEntry]:
        """Every model the server knows, on disk or loaded, with each version's state and the reason."""
        on_disk = await asyncio.to_thread(self.on_disk)  # the loaded state is read on the loop, the disk off it
        entries = [IndexEntry(mv.name, mv.version, "READY") for mv in self.versions()]
        entries += [IndexEntry(n, str(v), "UNAVAILABLE", why) for (n, v), why in sorted(self.failed.items())]
        entries += [IndexEntry(n, "", "LOADING") for n in sorted(self.loading) if n not in self.models]
        listed = {e.name for e in entries}
        for name in sorted((set(on_disk) | self.unloaded) - listed):
            reason = "unloaded" if name in self.unloaded else ""
            entries.append(IndexEntry(name, "", "UNAVAILABLE" if reason else "", reason))
        return entries

    async def _sync(
        self,
        found: dict[str, dict[int, Path]],
        scope: set[str] | None = None,
        atomic: bool = False,
        settings: dict[str, ModelSettings | None] | None = None,
    ) -> dict[tuple[str, int], str]:
        """Load what `found` and the version policy want, unload the rest, for the models in `scope` (None:
        every model). `settings` replaces models' settings (a None value: back to the folder's file or the flags)
        once they load; a loaded version whose settings change is loaded again with them and replaces the old one.
        `atomic`: a model with a failed version gets back exactly what it served before. Returns the versions
        that failed in this call."""
        settings = settings or {}
        async with self._lock:
            change = _Change()
            await self._load_wanted(found, settings, atomic, change)
            refused = {name for name, _ in change.failures} if atomic else set()
            await self._unload_unwanted(found, change, refused, scope)
            for name, given in settings.items():
                if name not in refused and given is not None:
                    self.given[name] = given
                elif name not in refused:
                    self.given.pop(name, None)
            self.failed = {
                k: v
                for k, v in self.failed.items()
                if (scope is not None and k[0] not in scope) or k[1] in found.get(k[0], {})
            }
            return change.failures

    async def _load_wanted(
        self, found, settings: dict[str, ModelSettings | None], atomic: bool, change: _Change
    ) -> None:
        """Load the versions the policy wants that are not loaded yet, or loaded with other settings (one bad
        version does not stop the others, unless `atomic`)."""
        for name, versions in found.items():
            try:
                chosen = self.settings_of(name, settings.get(name, KEEP))
            except InvalidInput as exc:  # the model's config file: every version refused, with the reason
                for version in versions:
                    self._refuse(name, version, str(exc), change.failures)
                self.bad_config.add(name)
                continue
            if name in self.bad_config:  # the file was fixed: its versions may load now
                self.bad_config.discard(name)
                self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
            candidates, limit = policy_candidates(versions, chosen)
            keep = change.wanted.setdefault(name, set())
            for version in candidates:
                if len(keep) >= limit:
                    break
                current = self.models.get(name, {}).get(version)
                if current is not None and current.settings == chosen:
                    keep.add(version)
                    continue
                if (name, version) in self.failed:
                    continue
                if await self._load_version(name, version, versions[version], chosen, change):
                    keep.add(version)
                elif current is not None:
                    keep.add(version)  # the old settings serve on
                    if atomic:
                        break
                elif atomic:
                    break

    async def _load_version(self, name: str, version: int, path: Path, chosen: ModelSettings, change: _Change) -> bool:
        """Load one version (verified as at start-up) and put it in place; the one it replaces is kept in
        `change` to be drained. False, with the failure recorded, when it does not load."""
        try:
            mv = await asyncio.to_thread(self.version_factory, name, version, path, chosen, self.settings)
        except Exception as exc:  # one bad version must not take the good ones down
            self._refuse(name, version, str(exc), change.failures)
            return False
        old = self.models.setdefault(name, {}).get(version)
        self.models[name][version] = mv
        if old is not None:
            change.replaced[(name, version)] = old
        change.added.setdefault(name, []).append(version)
        log.info(
            "loaded model %s version %d on %s in %.2fs (offline accuracy %s)%s",
            name, version, mv.provider, mv.load_seconds, mv.metadata.get("test_accuracy", "n/a"),
            " with new settings, replacing the loaded one" if old is not None else "",
        )  # fmt: skip
        return True

    def _refuse(self, name: str, version: int, reason: str, failures: dict) -> None:
        self.failed[(name, version)] = failures[(name, version)] = reason
        telemetry.load_failed(name)
        log.error("model %s version %d rejected: %s", name, version, reason)

    async def _unload_unwanted(self, found, change: _Change, refused: set[str], scope: set[str] | None) -> None:
        """Unload (drained first) what the policy no longer wants and the versions replaced by a reload; for a
        `refused` model, what this call added, putting back what it replaced."""
        for (name, version), old in list(change.replaced.items()):
            # The two loads of one version share its series: the one that goes must not drop them.
            if name in refused:  # roll back: the reloaded version goes, the old one serves again
                new = self.models[name][version]
                self.models[name][version] = old
                change.added[name].remove(version)
                log.info(
                    "unloading model %s version %d (rolled back: another version of this load failed)", name, version
                )
                await new.unload(forget=False)
                old.announce()
            else:
                log.info("unloading model %s version %d (replaced: loaded again with new settings)", name, version)
                await old.unload(forget=False)
        for name, loaded in list(self.models.items()):
            if scope is not None and name not in scope:
                continue
            if name in refused:  # roll back: what this call loaded goes, what was served stays
                gone = change.added.get(name, [])
            else:
                gone = [v for v in loaded if v not in change.wanted.get(name, set())]
            for version in gone:
                mv = loaded.pop(version)
                if name in refused:
                    why = "rolled back: another version of this load failed"
                elif version not in found.get(name, {}):
                    why = "removed from the repository"
                else:
                    why = f"version policy: {mv.settings.version_policy.partition(':')[0]}"
                log.info("unloading model %s version %d (%s)", name, version, why)
                await mv.unload()
            if not loaded:
                del self.models[name]


@dataclass
class _Change:
    """What one sync did: versions wanted per model, versions loaded now, the loaded versions they replaced,
    and the versions that failed."""

    wanted: dict[str, set[int]] = field(default_factory=dict)
    added: dict[str, list[int]] = field(default_factory=dict)
    replaced: dict[tuple[str, int], ModelVersion] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)
