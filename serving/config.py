"""Server settings: one class, read from SERVING_* environment variables and mapped from CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

IMAGE_PIXELS = 784
NUM_CLASSES = 10
# Room for the request envelope (names, shapes, parameters) beside the tensor bytes.
_MESSAGE_OVERHEAD_BYTES = 1 << 20


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
    merge_idle_us: int = Field(
        0,
        ge=0,
        description="A small request runs at once if the model was idle this long, else it joins the requests "
        "arriving in the same event-loop turn in one run (0: always at once, never merged).",
    )
    stream_max_in_flight: int = Field(
        64, ge=1, description="Unanswered requests per ModelStreamInfer stream; beyond it the server stops reading."
    )
    inline_max_images: int = Field(
        8, ge=0, description="Batches up to this size run on the event loop, larger ones on a thread (0: all)."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Execution provider: auto prefers CUDA and falls back to CPU."
    )
    cuda_device_id: int = Field(0, ge=0, description="CUDA device for the CUDA execution provider.")
    require_gpu: bool = Field(False, description="Exit non-zero at start-up unless CUDA is really in use.")
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime intra-op threads per worker (0: cores / workers; one worker: ORT's default)."
    )
    workers: int = Field(1, ge=1, description="Server processes sharing the gRPC port (SO_REUSEPORT).")
    grace_period_s: float = Field(10.0, ge=0, description="Drain time on SIGTERM before in-flight work is cut.")
    max_message_bytes: int = Field(
        0, ge=0, description="gRPC message limit; 0 sizes it for a max_batch_size FP32 request."
    )
    model_poll_interval_s: float = Field(
        0.0, ge=0, description="Rescan the repository for new/removed versions this often (0: never)."
    )
    canary_interval_s: float = Field(
        0.0, ge=0, description="Evaluate the golden set through the live model this often (0: off)."
    )
    canary_images: int = Field(1000, ge=1, le=10000, description="Size of the labelled golden set.")
    data_dir: Path = Field(Path("data"), description="Where the MNIST cache lives (for the canary).")
    verify_on_load: bool = Field(
        True, description="Refuse a version scoring >0.05 below its recorded test_accuracy (needs data_dir)."
    )
    feedback_capacity: int = Field(
        100_000, ge=1, description="Recent predictions kept for ground-truth feedback (bounded memory)."
    )
    accuracy_window: int = Field(1000, ge=1, description="Labelled answers in the sliding accuracy window.")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    log_level: str = Field("INFO", description="Python logging level.")

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.max_message_bytes == 0:
            self.max_message_bytes = self.max_batch_size * IMAGE_PIXELS * 4 + _MESSAGE_OVERHEAD_BYTES
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


def parse_args(argv: list[str] | None = None) -> Settings:
    """Map `--flags` onto Settings; flags override SERVING_* environment variables."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="V2 inference protocol gRPC server for the MNIST model on onnxruntime.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=f"{field.description} (default: {field.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:  # one line naming the flag, not a traceback
        parser.error("; ".join(_describe(e) for e in exc.errors()))


def _describe(error) -> str:
    where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-") + ": " if error["loc"] else ""
    return where + error["msg"].removeprefix("Value error, ")
