"""IO binding with per-bucket buffers, run against CPU memory: the part of the CUDA fast path CI can run."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serving.config import ModelSettings, Settings, bucket_sizes, parse_args
from serving.iobinding import BoundSession, bucket_for, host_buffer
from serving.runtime import CPU, CUDA, OnnxModel, uses_io_binding
from training.data import to_model_input


def test_bucket_sizes_are_sorted_cut_at_max_batch_size_which_is_always_last():
    assert bucket_sizes("64, 1,8,8,4096", 1024) == (1, 8, 64, 1024)
    assert bucket_sizes("1,2,4", 3) == (1, 2, 3)
    assert bucket_sizes("", 16) == (16,)
    assert Settings(max_batch_size=100, batch_buckets="1,10,1000").buckets == (1, 10, 100)


@pytest.mark.parametrize("spec", ["1,x", "0,4", "-2"])
def test_bad_bucket_lists_are_refused_at_start_up(spec, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--batch-buckets", spec])
    assert "batch_buckets must be" in capsys.readouterr().err


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch():
    buckets = (1, 4, 16)
    assert [bucket_for(n, buckets) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        bucket_for(17, buckets)


def test_io_binding_is_on_for_cuda_or_when_asked():
    assert uses_io_binding(Settings(), CUDA) and not uses_io_binding(Settings(), CPU)
    assert uses_io_binding(Settings(io_binding="on"), CPU)
    assert not uses_io_binding(Settings(io_binding="off"), CUDA)
    assert uses_io_binding(Settings(io_binding="off", cuda_graphs=True), CUDA)  # graphs need bound buffers
    assert not uses_io_binding(Settings(cuda_graphs=True), CPU)


def test_host_buffers_are_page_aligned_and_cuda_graphs_need_cuda(trained_repository):
    array, pinned = host_buffer((3, 784), np.uint8, pinned=False)
    assert array.shape == (3, 784) and array.ctypes.data % 4096 == 0 and not pinned
    model = OnnxModel(trained_repository / "mnist" / "1" / "model.onnx", Settings(device="cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need device='cuda'"):
        BoundSession(
            model.session, model.input_name, model.output_name, np.float32, buckets=(1,), device="cpu", cuda_graphs=True
        )


@pytest.fixture(scope="module")
def models(trained_repository):
    path = trained_repository / "mnist" / "1" / "model.onnx"
    plain = OnnxModel(path, Settings(device="cpu", io_binding="off"))
    bound = OnnxModel(path, Settings(device="cpu", io_binding="on", max_batch_size=1024, batch_buckets="1,4,64,512"))
    bound.warm_up(1024)
    assert not plain.bound and bound.bound[np.uint8].buckets == (1, 4, 64, 512, 1024)
    return plain, bound


@pytest.mark.parametrize("dtype", ["UINT8", "FP32"])
def test_io_binding_gives_the_same_answers_as_a_plain_run_on_all_10k_images(models, mnist_data, dtype):
    plain, bound = models
    pixels = np.ascontiguousarray(mnist_data.x_test.reshape(-1, 784))
    images = pixels if dtype == "UINT8" else to_model_input(pixels)
    expected = plain.run(images)
    # 300 and 700: padded up to 512 and 1024; 3000 > the largest bucket: run in chunks of 1024.
    for chunk in (300, 700, 3000):
        got = np.concatenate([bound.run(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        assert got.shape == (10_000, 10) and got.dtype == np.float32
        assert int((got.argmax(1) != expected.argmax(1)).sum()) == 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_padding_rows_left_by_a_previous_batch_do_not_leak_into_the_next(models, mnist_data):
    plain, bound = models
    pixels = np.ascontiguousarray(mnist_data.x_test[:7].reshape(-1, 784))
    bound.run(pixels[:4])  # fills bucket 4
    got = bound.run(pixels[4:7])  # 3 images in bucket 4: row 3 still holds image 3
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, plain.run(pixels[4:7]), rtol=0, atol=1e-6)
    assert bound.run(pixels[:0]).shape == (0, 10)


def test_buffers_are_allocated_once_per_bucket_not_per_request(models, mnist_data):
    _, bound = models
    session = bound.bound[np.uint8]
    slot = session._slots[64]
    before = (slot.host_in.ctypes.data, slot.host_out.ctypes.data, slot.binding, slot.out)
    pixels = np.ascontiguousarray(mnist_data.x_test[:50].reshape(-1, 784))
    first = session.run(pixels)
    second = session.run(pixels[::-1].copy())
    assert (slot.host_in.ctypes.data, slot.host_out.ctypes.data, slot.binding, slot.out) == before
    np.testing.assert_array_equal(second, first[::-1])  # the answer is a copy, not a view of the buffer


def test_concurrent_runs_in_one_bucket_each_get_their_own_answers(models, mnist_data):
    plain, bound = models
    pixels = np.ascontiguousarray(mnist_data.x_test[:400].reshape(-1, 784))
    expected = plain.run(pixels)
    errors: list[str] = []

    def worker(start: int) -> None:
        for _ in range(20):
            got = bound.run(pixels[start : start + 40])  # bucket 64, shared by all threads
            if not np.allclose(got, expected[start : start + 40], rtol=0, atol=1e-6):
                errors.append(f"rows {start}..{start + 40} answered wrongly")

    threads = [threading.Thread(target=worker, args=(40 * k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_cuda_graphs_need_one_execution_thread(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--cuda-graphs", "--instance-count", "2"])
    assert "cuda_graphs needs instance_count 1" in capsys.readouterr().err


async def test_every_run_of_a_version_happens_on_its_execution_thread(trained_repository, monkeypatch):
    """Loading (warm-up of every bucket, the accuracy check) and serving: no onnxruntime run of the version on any
    other thread, with IO binding as CUDA graphs use it (a graph is captured and replayed per thread)."""
    import onnxruntime as ort

    from serving.model_version import ModelVersion

    threads: list[int] = []
    for method in ("run", "run_with_iobinding"):
        original = getattr(ort.InferenceSession, method)

        def recording(self, *args, _original=original, **kwargs):
            threads.append(threading.get_ident())
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, method, recording)
    settings = Settings(io_binding="on", device="cpu", max_batch_size=64, batch_buckets="1,8")
    path = trained_repository / "mnist" / "1"
    mv = await asyncio.to_thread(ModelVersion, "mnist", 1, path, ModelSettings.within(settings), settings)
    try:
        loaded = len(threads)
        images = np.zeros((3, 784), dtype=np.float32)
        await asyncio.gather(*(mv.batcher.infer(images) for _ in range(8)), mv.batcher.infer(images.astype(np.uint8)))
        assert loaded > 0 and len(threads) > loaded  # warm-up and serving both ran through onnxruntime
        assert set(threads) <= mv.batcher.thread_ids, "an onnxruntime run on a thread that does not serve it"
    finally:
        await mv.unload()
