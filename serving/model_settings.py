"""Where a model's settings (serving.config.ModelSettings) are made: from a Triton ModelConfig (`config.pbtxt` in the
model's folder, `config.json`, or a RepositoryModelLoad's `config` parameter) over the server's flags, which stay the
defaults, or from the flags alone.

Settable: max_batch_size (up to the server's, which sizes the gRPC message limit), version_policy,
instance_group counts (execution threads) and dynamic_batching's max_queue_delay_microseconds. The name,
platform, backend, inputs and outputs may be restated as ModelConfig returns them, not changed.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format
from pydantic import ValidationError

from serving import codec
from serving.config import ModelSettings, Settings
from serving.errors import InvalidInput
from serving.protos import model_config_pb2 as mc

# The files a model's folder may hold its settings in, in the order they are looked for (Triton's first).
CONFIG_FILES = ("config.pbtxt", "config.json")
_SETTABLE = {"name", "platform", "backend", "max_batch_size", "version_policy", "instance_group", "dynamic_batching"}
_INTERFACE = {"input", "output", "parameters"}


def defaults(server: Settings) -> ModelSettings:
    """A model's settings when nothing but the flags sets them."""
    return ModelSettings.within(server)


def from_json(name: str, config: str, server: Settings) -> ModelSettings:
    """A load's `config` parameter: a Triton ModelConfig as JSON; InvalidInput naming what is wrong."""
    try:
        parsed = json_format.Parse(config, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise InvalidInput(f"'config' is not a ModelConfig in JSON: {exc}") from None
    return from_config(name, parsed, server)


def from_file(model_dir: Path, name: str, server: Settings) -> ModelSettings | None:
    """The settings in the model folder's config.pbtxt or config.json, or None when it has neither;
    InvalidInput naming the file when it is not a valid ModelConfig for this server."""
    for filename in CONFIG_FILES:
        path = model_dir / filename
        if not path.is_file():
            continue
        try:
            text = path.read_text()
            if filename.endswith(".json"):
                return from_json(name, text, server)
            return from_config(name, text_format.Parse(text, mc.ModelConfig()), server)
        except (OSError, UnicodeDecodeError, text_format.ParseError, InvalidInput) as exc:
            raise InvalidInput(f"{path}: {exc}") from None
    return None


def from_config(name: str, config: mc.ModelConfig, server: Settings) -> ModelSettings:
    """The flags with what `config` sets for model `name` (unset fields keep the flags')."""
    given = {f.name for f, _ in config.ListFields()}
    unsupported = sorted(given - _SETTABLE - _INTERFACE)
    if unsupported:
        raise InvalidInput(f"'config' sets {unsupported}, not supported here (settable: {sorted(_SETTABLE)})")
    if config.name not in ("", name):
        raise InvalidInput(f"'config' names model '{config.name}', the load is for '{name}'")
    if config.platform not in ("", codec.PLATFORM) or config.backend not in ("", "onnxruntime"):
        raise InvalidInput(f"'config': this server runs platform {codec.PLATFORM} (backend onnxruntime) only")
    _check_interface(config)
    update: dict = {}
    if config.max_batch_size:
        update["max_batch_size"] = config.max_batch_size
    if config.HasField("version_policy"):
        update["version_policy"] = _version_policy(config.version_policy)
    if config.instance_group:
        update["instance_count"] = sum(g.count or 1 for g in config.instance_group)
    if config.HasField("dynamic_batching"):
        update["max_queue_delay_us"] = config.dynamic_batching.max_queue_delay_microseconds
    try:
        return ModelSettings.within(server, **update)
    except ValidationError as exc:  # the field and the reason, as the flags' errors say them
        raise InvalidInput("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(error) -> str:
    where = " ".join(str(p) for p in error["loc"])
    return "'config' " + (where + ": " if where else "") + error["msg"].removeprefix("Value error, ")


def _version_policy(policy: mc.ModelVersionPolicy) -> str:
    kind = policy.WhichOneof("policy_choice")
    if kind == "latest":
        if policy.latest.num_versions < 1:
            raise InvalidInput("'config' version_policy latest needs num_versions >= 1")
        return f"latest:{policy.latest.num_versions}"
    if kind == "specific":
        if not policy.specific.versions or min(policy.specific.versions) < 0:
            raise InvalidInput("'config' version_policy specific needs versions >= 0")
        return "specific:" + ",".join(str(v) for v in policy.specific.versions)
    return "all"


def _check_interface(config: mc.ModelConfig) -> None:
    """Inputs and outputs may be restated (as ModelConfig returns them) but not changed."""
    pairs = (("input", config.input, codec.MODEL_INPUTS), ("output", config.output, codec.MODEL_OUTPUTS))
    for what, given, served in pairs:
        if given and _tensors(given) != _tensors(served):
            raise InvalidInput(f"'config' {what} differs from the served interface; every version takes input [N,784]")


def _tensors(tensors) -> list[tuple[str, int, list[int]]]:
    return [(t.name, t.data_type, list(t.dims)) for t in tensors]
