"""The settings: the server's (one class, read from SERVING_* environment variables and mapped from CLI flags) and
a model's (ModelSettings: what may differ between models, the flags being every model's defaults)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.contract import IMAGE_PIXELS

# Room for the request envelope (names, shapes, parameters) beside the tensor bytes.
_MESSAGE_OVERHEAD_BYTES = 1 << 20
# Poll mode's rescan period when none is given (Triton's --repository-poll-secs default).
DEFAULT_POLL_INTERVAL_S = 15.0
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _check_policy(value: str) -> str:
    parse_version_policy(value)
    return value


VersionPolicy = Annotated[str, AfterValidator(_check_policy)]  # 'latest:N', 'all' or 'specific:V[,V...]'


class Settings(BaseSettings):
    """Everything the server can be told. Each field is also a `--flag` (underscores become dashes)."""

    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="forbid")

    model_repository: Path = Field(Path("model_repository"), description="Model repository directory.")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to (0.0.0.0 in containers).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics port (0 disables it).")
    max_batch_size: int = Field(1024, ge=1, description="Most images in one request and in one merged run.")
    max_queue_delay_us: int = Field(
        0, ge=0, description="How long a batch may wait for more requests; 0 runs whatever is queued at once."
    )
    max_queue_images: int = Field(
        8192, ge=1, description="Images allowed to wait per model version before RESOURCE_EXHAUSTED."
    )
    max_inflight_bytes: int = Field(
        16 << 20,
        ge=1,
        description="Request bytes read and handled at once per process; beyond it RESOURCE_EXHAUSTED, mostly "
        "before the request is read (bounds memory; serving.admission).",
    )
    stream_window_bytes: int = Field(
        128 << 10,
        ge=0,
        description="HTTP/2 flow-control window per call: what gRPC may buffer of a request the server has not "
        "read (one refused unread included), fixed, with gRPC's BDP probing off; a request being read gets its "
        "whole size. 0: gRPC's default (BDP-tuned, several MiB per call: memory then grows with callers).",
    )
    malloc_arena_max: int = Field(
        1, ge=0, description="glibc malloc arenas per process (0: glibc's default of 8 per core); fewer hold less."
    )
    inline_max_images: int = Field(
        16,
        ge=0,
        description="On CPU, requests of at most this many images run on the event loop, all those that arrived "
        "in one loop iteration in one run; larger ones, and every run on CUDA, go to the execution threads "
        "(0: always the threads).",
    )
    stream_max_in_flight: int = Field(
        64, ge=1, description="Unanswered requests per ModelStreamInfer stream; beyond it the server stops reading."
    )
    instance_count: int = Field(
        1,
        ge=1,
        description="Execution threads per model version (Triton's instance count): each takes everything queued "
        "when it is free and runs it as one batch.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Execution provider: auto prefers CUDA and uses CPU when CUDA is missing or fails (logged); "
        "cuda refuses to start without CUDA.",
    )
    cuda_device_id: int = Field(0, ge=0, description="CUDA device for the CUDA execution provider.")
    require_gpu: bool = Field(
        False, description="Exit non-zero at start-up unless CUDA is really in use, with no node left on CPU."
    )
    tf32: bool = Field(
        False,
        description="On CUDA, let MatMul/Gemm round their inputs to TF32 (faster on Ampere and newer; answers "
        "then differ from CPU by up to 2e-3 in probability instead of 1e-5).",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="Run through IO binding with buffers allocated once per batch bucket (auto: on CUDA)."
    )
    batch_buckets: str = Field(
        "1,2,4,8,16,32,64,128,256,512,1024,2048,3072,4096",
        description="IO-binding batch sizes: a batch is padded up to the next one (max_batch_size is always one).",
    )
    pinned_memory: bool = Field(True, description="On CUDA, stage inputs in page-locked host memory.")
    cuda_graphs: bool = Field(
        False, description="On CUDA, capture one CUDA graph per batch bucket and replay it (implies IO binding)."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per execution thread (0: the cores not taken by the workers' "
        "event loops, shared by workers x instance_count, at least 1).",
    )
    workers: int = Field(1, ge=1, description="Server processes sharing the gRPC port (SO_REUSEPORT).")
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM keep answering this long while health says NOT_SERVING, so load balancers and "
        "clients move away before the port closes (the manifests use 5; SIGINT skips it; a second signal cuts it).",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="After the drain delay: time accepted calls get to finish before they are cut."
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="Close each client connection (GOAWAY) after about this long so long-lived clients reconnect "
        "and spread over new replicas (0: never).",
    )
    max_connection_age_grace_s: float = Field(
        10.0, ge=0, description="Time calls in flight on an aged connection get to finish before it is closed."
    )
    max_message_bytes: int = Field(
        0, ge=0, description="gRPC message limit; 0 sizes it for a max_batch_size FP32 request."
    )
    version_policy: VersionPolicy = Field(
        "latest:2",
        description="Versions to serve per model: 'latest:N' (the newest N that load), 'all', or 'specific:1,3'.",
    )
    model_name: str = Field(
        "",
        description="Serve a single-model layout (version folders, or one model.onnx, directly under "
        "model_repository, as KServe's storage initializer leaves it) under this name; a repository keeps its names.",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="What changes the served models after start (Triton's names): none; poll (rescan the "
        "repository every model_poll_interval_s); explicit (RepositoryModelLoad/Unload over gRPC).",
    )
    model_poll_interval_s: float = Field(
        0.0,
        ge=0,
        description=f"Poll mode's rescan period (0: {DEFAULT_POLL_INTERVAL_S:g}); set alone, it implies poll mode.",
    )
    load_model: list[str] = Field(
        [],
        description="Explicit mode: a model to load at start (repeatable; '*' loads every model).",
    )
    model_control_header: str = Field(
        "",
        description="Explicit mode: 'name=value' a caller must send as gRPC metadata to load or unload "
        "(required; others get PERMISSION_DENIED).",
    )
    canary_interval_s: float = Field(
        0.0, ge=0, description="Evaluate the golden set through the live model this often (0: off)."
    )
    canary_images: int = Field(1000, ge=1, le=10000, description="Size of the labelled golden set.")
    data_dir: Path = Field(Path("data"), description="Where the MNIST cache lives (for the canary).")
    verify_on_load: bool = Field(
        True, description="Refuse a version scoring >0.05 below its recorded test_accuracy (needs data_dir)."
    )
    receipt_key_file: Path | None = Field(
        None,
        description="HMAC key (>= 16 bytes) signing prediction receipts; share it across replicas. "
        "None: a random key per server, receipts then verify only in that server.",
    )
    receipt_max_age_s: float = Field(
        86_400.0, gt=0, description="Feedback for a receipt older than this is refused (INVALID_ARGUMENT)."
    )
    feedback_capacity: int = Field(
        200_000, ge=1, description="Receipts remembered per process to refuse duplicate labels (bounded memory)."
    )
    accuracy_window: int = Field(
        1000, ge=1, description="Labelled answers in this process's sliding accuracy window (the gauge)."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    log_level: str = Field("INFO", description="Python logging level.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The event loop gRPC runs on: uvloop (less CPU per request) or asyncio's own."
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.max_message_bytes == 0:
            self.max_message_bytes = self.max_batch_size * IMAGE_PIXELS * 4 + _MESSAGE_OVERHEAD_BYTES
        bucket_sizes(self.batch_buckets, self.max_batch_size)  # a bad list fails here, naming the flag
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        self._derive_model_control()
        ModelSettings.within(self)  # the flags are every model's defaults: they obey the per-model rules too
        return self

    def _derive_model_control(self) -> None:
        if self.model_control_mode == "none" and self.model_poll_interval_s:
            self.model_control_mode = "poll"  # the interval alone meant polling before the mode existed
        if self.model_control_mode == "poll" and not self.model_poll_interval_s:
            self.model_poll_interval_s = DEFAULT_POLL_INTERVAL_S
        if self.model_control_mode != "explicit":
            if self.load_model or self.model_control_header:
                raise ValueError("load_model and model_control_header need model_control_mode explicit")
            return
        if self.model_poll_interval_s:
            raise ValueError("model_poll_interval_s polls the repository: it needs model_control_mode poll")
        if self.workers > 1:
            raise ValueError("model_control_mode explicit needs workers 1 (a load would reach one worker only)")
        parse_control_header(self.model_control_header)  # required and well-formed

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch sizes IO binding allocates buffers for, ascending, the last one max_batch_size."""
        return bucket_sizes(self.batch_buckets, self.max_batch_size)


def bucket_sizes(spec: str, max_batch_size: int) -> tuple[int, ...]:
    """The sorted bucket sizes of a comma-separated list, cut at max_batch_size, which is always the last."""
    try:
        sizes = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"batch_buckets must be comma-separated integers, got {spec!r}") from None
    if any(size < 1 for size in sizes):
        raise ValueError(f"batch_buckets must be positive, got {spec!r}")
    return tuple(sorted(size for size in sizes if size < max_batch_size)) + (max_batch_size,)


def parse_control_header(spec: str) -> tuple[str, str]:
    """'name=value' -> (name, value): the gRPC metadata a model-control caller must send."""
    name, sep, value = spec.partition("=")
    name = name.strip().lower()
    if not sep or not value or not _HEADER_NAME.fullmatch(name) or name.startswith("grpc-") or name.endswith("-bin"):
        raise ValueError(
            "model_control_header must be 'name=value' (a lowercase metadata name, not grpc-* or *-bin, and a "
            "non-empty value): explicit model control is only open to callers that send it"
        )
    return name, value


def parse_version_policy(text: str) -> tuple[str, tuple[int, ...]]:
    """'latest:N' -> ('latest', (N,)), 'all' -> ('all', ()), 'specific:1,3' -> ('specific', (1, 3))."""
    kind, _, numbers = text.strip().partition(":")
    try:
        values = tuple(int(v) for v in numbers.split(",")) if numbers else ()
    except ValueError:
        values = None
    if kind == "all" and not numbers:
        return kind, ()
    if kind == "latest" and values and len(values) == 1 and values[0] >= 1:
        return kind, values
    if kind == "specific" and values and min(values) >= 0:
        return kind, values
    raise ValueError(f"'{text}' is not a version policy: use 'latest:N' (N >= 1), 'all' or 'specific:V[,V...]'")


# The settings by concern, as `--help` lists them and docs/configuration.md documents them (a test checks both).
GROUPS: dict[str, tuple[str, ...]] = {
    "server": (
        "model_repository", "host", "grpc_port", "workers", "max_message_bytes", "max_inflight_bytes",
        "stream_window_bytes", "malloc_arena_max", "tls_cert", "tls_key", "log_level", "event_loop",
    ),
    "batching": (
        "max_batch_size", "max_queue_delay_us", "max_queue_images", "instance_count", "inline_max_images",
        "stream_max_in_flight",
    ),
    "runtime": (
        "device", "cuda_device_id", "require_gpu", "tf32", "io_binding", "batch_buckets", "pinned_memory",
        "cuda_graphs", "intra_op_threads",
    ),
    "models": (
        "version_policy", "model_name", "model_control_mode", "model_poll_interval_s", "load_model",
        "model_control_header", "verify_on_load", "data_dir",
    ),
    "observability": (
        "metrics_port", "canary_interval_s", "canary_images", "accuracy_window", "receipt_key_file",
        "receipt_max_age_s", "feedback_capacity",
    ),
    "drain": ("drain_delay_s", "grace_period_s", "max_connection_age_s", "max_connection_age_grace_s"),
}  # fmt: skip


class ModelSettings(BaseModel):
    """What may differ between models (Triton's ModelConfig fields this server honours), validated wherever it is
    made: from the flags (every model's defaults), a model folder's config file or a load's config
    (serving/model_settings.py makes them from those). The server's settings are the limits it is checked against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(ge=1)
    max_queue_delay_us: int = Field(ge=0)
    instance_count: int = Field(ge=1)
    version_policy: VersionPolicy

    @model_validator(mode="after")
    def _within_server(self, info: ValidationInfo) -> ModelSettings:
        server: Settings = info.context["server"]
        if self.max_batch_size > server.max_batch_size:
            raise ValueError(
                f"max_batch_size {self.max_batch_size} exceeds the server's {server.max_batch_size} "
                "(it sizes the gRPC message limit)"
            )
        if server.cuda_graphs and self.instance_count > 1:
            # onnxruntime keeps CUDA graphs per thread and runs a graph-capturing session from one thread only.
            raise ValueError("cuda_graphs needs instance_count 1 (CUDA graphs are captured and replayed per thread)")
        return self

    @classmethod
    def within(cls, server: Settings, **given: object) -> ModelSettings:
        """The server's defaults with what `given` sets; ValidationError naming the field otherwise."""
        values = {name: getattr(server, name) for name in cls.model_fields} | given
        return cls.model_validate(values, context={"server": server})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str] | None = None) -> Settings:
    """Map `--flags` onto Settings; flags override SERVING_* environment variables."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="V2 inference protocol gRPC server for the MNIST model on onnxruntime.",
    )
    for group, names in GROUPS.items():
        section = parser.add_argument_group(group)
        for name in names:
            field = Settings.model_fields[name]
            if field.annotation is bool:
                section.add_argument(
                    flag(name), action=argparse.BooleanOptionalAction, default=None, help=field.description
                )
            elif field.annotation == list[str]:
                section.add_argument(
                    flag(name), action="append", default=None, help=f"{field.description} (default: none)"
                )
            else:
                section.add_argument(flag(name), default=None, help=f"{field.description} (default: {field.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:  # one line naming the flag, not a traceback
        parser.error("; ".join(_describe(e) for e in exc.errors()))


def _describe(error) -> str:
    where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-") + ": " if error["loc"] else ""
    return where + error["msg"].removeprefix("Value error, ")
