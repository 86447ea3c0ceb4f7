"""Command-line client: `predict` PNG files, `evaluate` the MNIST test set over gRPC, `health`; `load`, `unload` and
`index` of models (explicit model control), on one server or on every replica behind a DNS name."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.contract import IMAGE_PIXELS, INPUT_NAME, OUTPUT_NAME, PIXEL_SCALE, TestSetError, read_test_set
from serving.errors import StartupError
from serving.protos import feedback_pb2
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc


def image_to_mnist(path: Path) -> np.ndarray:
    """Any PNG -> 28x28 uint8 the MNIST way: white digit on black, fitted to 20x20, centred by mass."""
    from PIL import Image, ImageOps

    img = Image.open(path).convert("L")
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.mean() > 127:  # dark digit on a light background: invert to MNIST's polarity
        img = ImageOps.invert(img)
        pixels = np.asarray(img, dtype=np.uint8)
    mask = pixels > 30
    if mask.any():
        rows, cols = np.where(mask)
        img = img.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    scale = 20.0 / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    digit = np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
    canvas = np.zeros((28, 28))
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = digit
    total = canvas.sum()
    if total > 0:  # shift the centre of mass to the middle, as MNIST was made
        ys, xs = np.indices(canvas.shape)
        dy, dx = round(14 - (ys * canvas).sum() / total), round(14 - (xs * canvas).sum() / total)
        canvas = np.roll(canvas, (dy, dx), axis=(0, 1))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def infer_request(
    images: np.ndarray, model: str, version: str = "", datatype: str = "UINT8", request_id: str = ""
) -> pb.ModelInferRequest:
    """A ModelInferRequest for uint8 images (N,28,28) or (N,784), sent raw as UINT8 or FP32."""
    flat = images.reshape(images.shape[0], IMAGE_PIXELS)
    raw = flat.astype(np.uint8) if datatype == "UINT8" else flat.astype("<f4") / np.float32(PIXEL_SCALE)
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=INPUT_NAME, datatype=datatype, shape=flat.shape)],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)],
        raw_input_contents=[raw.tobytes()],
    )


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.name == OUTPUT_NAME:
            return np.frombuffer(raw, dtype="<f4").reshape(tuple(tensor.shape))
    raise ValueError("response has no 'probabilities' output")


def receipt_of(response: pb.ModelInferResponse) -> str:
    """The signed receipt of a response ('' if none): keep it to send the true labels later."""
    return response.parameters["receipt"].string_param if "receipt" in response.parameters else ""


def feedback_request(receipt: str, labels, indexes=None) -> feedback_pb2.FeedbackRequest:
    """SendFeedback for an earlier response: `labels[i]` is the true class of image `indexes[i]` (default i)."""
    indexes = range(len(labels)) if indexes is None else indexes
    return feedback_pb2.FeedbackRequest(
        receipt=receipt,
        labels=[feedback_pb2.Label(index=int(i), label=int(v)) for i, v in zip(indexes, labels, strict=True)],
    )


def _say(line: str) -> None:
    """Command output (this is a CLI: results go to stdout, not to the log)."""
    sys.stdout.write(line + "\n")


# What a client of a replicated deployment needs (deploy/README.md, "Load balancing"):
# - round_robin over every address the target resolves to (a headless Service's pod IPs), so calls spread over
#   replicas and a new replica gets traffic as soon as DNS lists it;
# - client-side health checking: a replica that reports NOT_SERVING (draining, loading) gets no new calls;
# - a retry policy on UNAVAILABLE (what a replica says in its last moments, with a retry pushback), so a rollout
#   or scale-down never shows as an error. Inference is idempotent, so retrying it is safe.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
RETRIED_SERVICES = ("inference.GRPCInferenceService", "mnist.feedback.v1.FeedbackService", "grpc.health.v1.Health")
MAX_MESSAGE_BYTES = 64 << 20


def service_config(load_balancing: str = "round_robin") -> dict:
    """The gRPC service config this project recommends: `round_robin` with health checking, or `pick_first`."""
    config: dict = {
        "loadBalancingConfig": [{load_balancing: {}}],
        "methodConfig": [{"name": [{"service": s} for s in RETRIED_SERVICES], "retryPolicy": RETRY_POLICY}],
    }
    if load_balancing == "round_robin":
        config["healthCheckConfig"] = {"serviceName": ""}  # "" = ready to infer (serving/server.py)
    return config


def channel_options(load_balancing: str = "round_robin", max_message_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Channel options: the service config above, retries on, message limits and a retry buffer that holds a
    whole request (a request larger than the buffer is never retried)."""
    return [
        ("grpc.service_config", json.dumps(service_config(load_balancing))),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", 4 * max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _channel(args, load_balancing: str | None = None) -> grpc.Channel:
    options = channel_options(load_balancing or args.lb)
    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.url, creds, options=options)
    return grpc.insecure_channel(args.url, options=options)


def cmd_predict(args) -> int:
    stub = pb_grpc.GRPCInferenceServiceStub(_channel(args))
    images = np.stack([image_to_mnist(Path(p)) for p in args.images])
    request = infer_request(images, args.model, args.model_version)
    probs = probabilities(stub.ModelInfer(request, timeout=args.timeout, metadata=args.metadata))
    for path, p in zip(args.images, probs, strict=True):
        digit = int(p.argmax())
        _say(f"{path}: {digit}  (p={p[digit]:.4f})  " + " ".join(f"{d}:{v:.3f}" for d, v in enumerate(p)))
    return 0


def cmd_evaluate(args) -> int:
    try:
        x, y = read_test_set(args.data_dir)
    except TestSetError as exc:
        _say(f"error: {exc}")
        return 2
    x, y = x[: args.limit], y[: args.limit]
    stub = pb_grpc.GRPCInferenceServiceStub(_channel(args))
    requests = [
        infer_request(x[lo : lo + args.batch_size], args.model, args.model_version, args.datatype, request_id=str(lo))
        for lo in range(0, len(x), args.batch_size)
    ]
    started = time.perf_counter()
    answers, latencies = (_stream if args.stream else _unary)(stub, requests, args.timeout, args.metadata)
    elapsed = time.perf_counter() - started
    correct = sum(
        int((probabilities(answers[r.id]).argmax(axis=1) == y[int(r.id) : int(r.id) + args.batch_size]).sum())
        for r in requests
    )
    ms = np.percentile(np.array(latencies) * 1e3, [50, 90, 99])
    version = answers[requests[-1].id].model_version or "?"
    how = "ModelStreamInfer" if args.stream else "ModelInfer"
    _say(f"model {args.model} version {version} via {args.url} ({args.datatype}, {how})")
    _say(f"accuracy {correct / len(x):.4f} on {len(x)} test images ({correct} correct)")
    _say(
        f"{len(latencies)} requests of {args.batch_size} images in {elapsed:.2f}s: "
        f"{len(x) / elapsed:,.0f} images/s; latency p50 {ms[0]:.2f} ms, p90 {ms[1]:.2f} ms, p99 {ms[2]:.2f} ms"
    )
    return 0


def _unary(stub, requests: list, timeout: float, metadata=()) -> tuple[dict, list[float]]:
    """One ModelInfer call after another."""
    answers, latencies = {}, []
    for request in requests:
        t0 = time.perf_counter()
        answers[request.id] = stub.ModelInfer(request, timeout=timeout, metadata=metadata)
        latencies.append(time.perf_counter() - t0)
    return answers, latencies


def _stream(stub, requests: list, timeout: float, metadata=()) -> tuple[dict, list[float]]:
    """Every request on one ModelStreamInfer stream, as fast as the server takes them (it bounds the in-flight)."""
    sent: dict[str, float] = {}

    def outgoing():
        for request in requests:
            sent[request.id] = time.perf_counter()
            yield request

    answers, latencies = {}, []
    for response in stub.ModelStreamInfer(outgoing(), timeout=timeout + len(requests), metadata=metadata):
        if response.error_message:
            raise grpc.RpcError(f"request {response.infer_response.id}: {response.error_message}")
        answer = response.infer_response
        latencies.append(time.perf_counter() - sent[answer.id])
        answers[answer.id] = answer
    return answers, latencies


def cmd_health(args) -> int:
    # pick_first: a health-checking round_robin channel would not send the check to a NOT_SERVING server.
    stub = health_pb2_grpc.HealthStub(_channel(args, "pick_first"))
    status = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    _say(f"{args.service or '(server)'}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def replica_targets(target: str) -> list[str]:
    """Every address `target` resolves to, as host:port targets. `dns:///name:port` (or `name:port`) of a headless
    Service resolves to one address per ready pod: each replica is then called on its own."""
    name = target
    if name.startswith("dns:"):
        authority, _, rest = name.removeprefix("dns:").removeprefix("//").rpartition("/")
        if authority:
            raise ValueError(f"'{target}': a DNS server in the target is not supported; use dns:///name:port")
        name = rest
    host, sep, port = name.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"'{target}' is not dns:///name:port or name:port")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve '{host}': {exc}") from None
    addresses = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


def control_metadata(header: str) -> list[tuple[str, str]]:
    """The model-control header ('name=value', as the server's --model-control-header) as gRPC metadata."""
    if not header:
        return []
    name, sep, value = header.partition("=")
    if not sep:
        raise ValueError("--header must be name=value")
    return [(name.strip().lower(), value)]


def load_request(model: str, config: str | None, files: list[str]) -> pb.RepositoryModelLoadRequest:
    """RepositoryModelLoad as Triton's clients send it: `config` JSON and `file:<version>/<name>` bytes."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        request.parameters["config"].string_param = Path(config[1:]).read_text() if config.startswith("@") else config
    for spec in files:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--file '{spec}': expected <version>/<name>=<local path>, e.g. 2/model.onnx=model.onnx")
        request.parameters[f"file:{name}"].bytes_param = Path(path).read_bytes()
    return request


def _replica_call(args, target: str, method: str, request, host: str) -> str:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if args.tls_ca:
        # Certificates name the Service, not each pod's address.
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        channel = grpc.secure_channel(target, creds, options=options + [("grpc.ssl_target_name_override", host)])
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = getattr(stub, method)(request, metadata=control_metadata(args.header), timeout=args.timeout)
    if method == "RepositoryIndex":
        return ", ".join(f"{m.name}/{m.version or '-'} {m.state or '(not loaded)'}" for m in reply.models) or "empty"
    return "OK"


def cmd_control(args) -> int:
    """load / unload / index on --url, or with --all-replicas on every address the target resolves to."""
    target = args.all_replicas or args.url
    if args.command == "load":
        method, request = "RepositoryModelLoad", load_request(args.model, args.config, args.file)
    elif args.command == "unload":
        method, request = "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=args.model)
    else:
        method, request = "RepositoryIndex", pb.RepositoryIndexRequest()
    replicas = replica_targets(target) if args.all_replicas else [target]
    host = target.removeprefix("dns:").lstrip("/").rpartition(":")[0].strip("[]")

    def call(replica: str) -> tuple[str, str | None]:
        try:
            return replica, _replica_call(args, replica, method, request, host)
        except grpc.RpcError as exc:
            return replica, f"error: {exc.code().name}: {exc.details()}"

    with ThreadPoolExecutor(max_workers=min(16, len(replicas) or 1)) as pool:
        results = list(pool.map(call, replicas))
    for replica, outcome in results:
        _say(f"{replica}: {args.command} {args.model if method != 'RepositoryIndex' else ''}".rstrip() + f": {outcome}")
    failed = sum(outcome.startswith("error:") for _, outcome in results)
    if args.all_replicas:
        _say(f"{len(results) - failed} of {len(results)} replicas behind {target} OK")
    return 2 if failed or not results else 0


def _parser() -> argparse.ArgumentParser:
    """The command line: predict, evaluate, health and the model-control commands."""
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__)
    parser.add_argument(
        "--url",
        default="127.0.0.1:8001",
        help="server address host:port, or a gRPC target such as dns:///mnist-serving-headless.mnist:8001",
    )
    parser.add_argument(
        "--lb",
        choices=("round_robin", "pick_first"),
        default="round_robin",
        help="load balancing over the addresses the target resolves to (round_robin checks health)",
    )
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--model-version", default="", help="default: the newest")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds")
    parser.add_argument("--tls-ca", help="PEM CA certificate: use TLS")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="send a W3C traceparent with predict/evaluate calls and print the trace id (also on whenever "
        "OTEL_TRACES_EXPORTER is set, which exports the client's span as well)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify PNG images")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)
    e = sub.add_parser("evaluate", help="accuracy and latency on the MNIST test set")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--datatype", choices=("UINT8", "FP32"), default="UINT8")
    e.add_argument("--limit", type=int, default=10_000)
    e.add_argument("--data-dir", default="data")
    e.add_argument("--stream", action="store_true", help="send every request on one ModelStreamInfer stream")
    e.set_defaults(func=cmd_evaluate)
    h = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    h.add_argument("--service", default="", help="'' (server), liveness, or a model name")
    h.set_defaults(func=cmd_health)
    _add_control_commands(sub)
    return parser


def _add_control_commands(sub) -> None:
    """load, unload and index: on one server (--url) or on every replica (--all-replicas)."""
    for command, text in (
        ("load", "load or reload --model (explicit model control), optionally with a config and files"),
        ("unload", "unload --model once its queued requests are answered (explicit model control)"),
        ("index", "RepositoryIndex: every model with its state and reason"),
    ):
        c = sub.add_parser(command, help=text)
        c.add_argument(
            "--all-replicas",
            metavar="TARGET",
            help="call every replica: each address TARGET resolves to (dns:///<headless service>:8001), "
            "one result line each; exit 0 only if every replica succeeded",
        )
        c.add_argument(
            "--header",
            default=os.environ.get("MODEL_CONTROL_HEADER", ""),
            help="name=value the server requires (its --model-control-header; default: $MODEL_CONTROL_HEADER)",
        )
        if command == "load":
            c.add_argument("--config", help="the model's settings as a Triton ModelConfig in JSON (or @file)")
            c.add_argument(
                "--file",
                action="append",
                default=[],
                help="<version>/<name>=<local path> sent as file:<version>/<name> (needs --config); repeatable",
            )
        c.set_defaults(func=cmd_control)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        trace = _trace(args)
    except StartupError as exc:  # a bad OTEL_* value
        sys.stderr.write(f"error: {exc}\n")
        return 2
    args.metadata = trace.metadata if trace else ()
    try:
        return args.func(args)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except grpc.RpcError as exc:
        if hasattr(exc, "code"):
            sys.stderr.write(f"error: {exc.code().name}: {exc.details()}\n")
        else:  # a ModelStreamInfer response carrying error_message
            sys.stderr.write(f"error: {exc}\n")
        return 2
    finally:
        if trace is not None:
            trace.end()
            sys.stderr.write(f"trace id: {trace.trace_id}\n")


def _trace(args):
    """The command's trace (predict and evaluate), when asked for by --trace or the OTEL_* variables."""
    from serving.tracing import ClientTrace, TracingConfig

    if args.command not in ("predict", "evaluate") or not (args.trace or TracingConfig.read(os.environ)):
        return None
    return ClientTrace(f"serving.client {args.command}")


if __name__ == "__main__":
    sys.exit(main())
