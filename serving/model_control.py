"""Explicit model control (Triton's --model-control-mode explicit): who may load and unload, and what a load means."""

from __future__ import annotations

import hmac
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.config import Settings, parse_control_header
from serving.discovery import is_version
from serving.errors import InvalidInput, ModelControlOff, ModelNotFound, PermissionDenied
from serving.model_settings import from_json
from serving.protos import grpc_service_pb2 as pb
from serving.repository import ModelRepository

log = logging.getLogger(__name__)

CONFIG = "config"
FILE_PREFIX = "file:"
# The files a load may carry per version (Triton's `file:<version>/<name>`): the model and its metadata.
VERSION_FILES = ("model.onnx", "metadata.json")


@dataclass(frozen=True)
class LoadOptions:
    """RepositoryModelLoad's parameters as plain values: the `config` JSON and the `file:` contents by path."""

    config: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def load_options(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> LoadOptions:
    """Read a load's parameters; anything but `config` (a string) and `file:` paths (bytes) is refused."""
    config, files = None, {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == CONFIG and kind == "string_param":
            config = value.string_param
        elif key.startswith(FILE_PREFIX) and kind == "bytes_param":
            files[key.removeprefix(FILE_PREFIX)] = value.bytes_param
        else:
            raise InvalidInput(
                f"unsupported load parameter '{key}' ({kind}): "
                "use 'config' (string) and 'file:<version>/<name>' (bytes)"
            )
    if files and config is None:
        raise InvalidInput("a load with 'file:' parameters needs the 'config' parameter too (as Triton requires)")
    return LoadOptions(config, files)


def write_files(name: str, files: Mapping[str, bytes]) -> tuple[Path, dict[int, Path]]:
    """A load's files in a fresh directory of their own: (directory, its version folders by version)."""
    paths = {}
    for path, content in files.items():
        version, _, filename = path.partition("/")
        if not is_version(version) or filename not in VERSION_FILES:
            expected = f"{FILE_PREFIX}<version>/<{'|'.join(VERSION_FILES)}>"
            raise InvalidInput(f"file '{FILE_PREFIX}{path}': expected '{expected}'")
        paths[(int(version), filename)] = content
    missing = sorted({v for v, _ in paths} - {v for v, f in paths if f == "model.onnx"})
    if missing:
        raise InvalidInput(f"the files of version(s) {missing} have no model.onnx")
    root = Path(tempfile.mkdtemp(prefix=f"model-{name}-"))
    for (version, filename), content in paths.items():
        (root / str(version)).mkdir(exist_ok=True)
        (root / str(version) / filename).write_bytes(content)
    return root, {version: root / str(version) for version, _ in paths}


class ModelControl:
    """Loads and unloads over gRPC in explicit mode, for callers that send the configured header."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        on_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.explicit = settings.model_control_mode == "explicit"
        self.header = parse_control_header(settings.model_control_header) if self.explicit else None
        self.on_change = on_change
        self.uploads: dict[str, Path] = {}  # the directory of the files a model was last loaded from

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Refuse unless explicit mode is on and the caller sent the header (compared in constant time)."""
        if not self.explicit:
            raise ModelControlOff(
                f"model control mode is {self.settings.model_control_mode}: loads and unloads over gRPC need "
                "--model-control-mode explicit"
            )
        name, value = self.header
        sent = [v for k, v in metadata or () if k == name and isinstance(v, str)]
        if not any(hmac.compare_digest(v.encode(), value.encode()) for v in sent):
            raise PermissionDenied(f"model control needs the '{name}' metadata header with the configured value")

    async def load(self, name: str, options: LoadOptions) -> None:
        """Load (or reload) `name`: from the repository, or from the load's files; with its `config` if any."""
        if not name:
            raise InvalidInput("RepositoryModelLoad needs a model_name")
        settings = from_json(name, options.config, self.settings) if options.config is not None else None
        upload = None
        if options.files:
            upload, versions = write_files(name, options.files)
        else:
            versions = self.repository.on_disk().get(name)
            if versions is None:
                raise ModelNotFound(f"no model '{name}' in the repository '{self.repository.root}'")
        try:
            await self.repository.load(name, versions, settings)
        except BaseException:
            if upload is not None:
                shutil.rmtree(upload, ignore_errors=True)
            raise
        finally:
            await self._changed(name)
        self._replace_upload(name, upload)
        log.info("loaded model %s (RepositoryModelLoad%s)", name, ", with files" if upload else "")

    async def unload(self, name: str) -> None:
        """Unload every version of `name` once what is queued for it is answered."""
        if not name:
            raise InvalidInput("RepositoryModelUnload needs a model_name")
        try:
            await self.repository.unload(name)
        finally:
            await self._changed(name)
        self._replace_upload(name, None)
        log.info("unloaded model %s (RepositoryModelUnload)", name)

    def close(self) -> None:
        for name in list(self.uploads):
            self._replace_upload(name, None)

    def _replace_upload(self, name: str, upload: Path | None) -> None:
        previous = self.uploads.pop(name, None)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        if upload is not None:
            self.uploads[name] = upload

    async def _changed(self, name: str) -> None:
        if self.on_change is not None:
            await self.on_change(name)
