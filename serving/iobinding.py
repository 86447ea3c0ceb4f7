"""IO binding for one onnxruntime session: buffers allocated once per batch bucket, a batch padded up to its bucket.

On CUDA each bucket owns a device input and output (fixed addresses, so a CUDA graph can replay over them) and
a host staging buffer, page-locked when possible so the host-to-device copy is a DMA at full PCIe speed. On CPU
the same code binds host buffers directly (no copy on the way in): that path is what the unit tests exercise.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from serving.contract import IMAGE_PIXELS, NUM_CLASSES

log = logging.getLogger(__name__)

_PAGE = 4096
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_cudart: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not available


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding n images (buckets ascending); ValueError above the largest."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _load_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime already loaded by onnxruntime.preload_dlls() (found by soname), else None."""
    global _cudart
    if _cudart is False:
        _cudart = None
        for name in _CUDART_NAMES:
            try:
                _cudart = ctypes.CDLL(name)
                break
            except OSError:
                continue
    return _cudart


def host_buffer(shape: tuple[int, ...], dtype, pinned: bool) -> tuple[np.ndarray, bool]:
    """A page-aligned host array; with `pinned`, page-locked for CUDA (cudaHostRegister). Returns (array, pinned?)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _PAGE, dtype=np.uint8)
    offset = (-raw.ctypes.data) % _PAGE
    array = raw[offset : offset + nbytes].view(dtype).reshape(shape)
    if not pinned:
        return array, False
    cudart = _load_cudart()
    if cudart is None:
        log.warning("no CUDA runtime library found (%s): host buffers stay pageable", ", ".join(_CUDART_NAMES))
        return array, False
    ptr = array.ctypes.data
    # flags 1 = cudaHostRegisterPortable: page-locked for every CUDA context, ORT's included.
    rc = cudart.cudaHostRegister(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(1))
    if rc != 0:
        log.warning("cudaHostRegister(%d bytes) failed with CUDA error %d: host buffer stays pageable", nbytes, rc)
        return array, False
    # Unregister before numpy frees the memory (weakref callbacks run before the data is released).
    weakref.finalize(raw, cudart.cudaHostUnregister, ctypes.c_void_p(ptr))
    return array, True


@dataclass
class _Slot:
    """One bucket: the host staging input, the bound input/output OrtValues, the binding and its run options."""

    size: int
    host_in: np.ndarray
    host_out: np.ndarray | None  # CPU only: the output is bound straight to this array
    device_in: ort.OrtValue | None  # CUDA only: the device copy of host_in
    out: ort.OrtValue
    binding: ort.IOBinding
    run_options: ort.RunOptions
    lock: threading.Lock


class BoundSession:
    """Runs one session through IO binding, one pre-allocated slot per batch bucket; `run` is thread-safe."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str,
        output_name: str,
        dtype,
        *,
        buckets: Sequence[int],
        device: str = "cpu",
        device_id: int = 0,
        pinned: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if cuda_graphs and device != "cuda":
            raise ValueError("CUDA graphs need device='cuda'")
        self.session = session
        self.dtype = np.dtype(dtype)
        self.buckets = tuple(buckets)
        self.device = device
        self.cuda_graphs = cuda_graphs
        # A session with CUDA graphs must not run concurrently (onnxruntime's rule): one lock for all slots.
        shared_lock = threading.Lock() if cuda_graphs else None
        self.input_name, self.output_name, self.device_id = input_name, output_name, device_id
        self._slots: dict[int, _Slot] = {}
        pinned_buckets = []
        for graph_id, size in enumerate(self.buckets, start=1):
            slot, locked = self._slot(size, graph_id, pinned and device == "cuda", shared_lock)
            self._slots[size] = slot
            if locked:
                pinned_buckets.append(size)
        # Page-locked staging for every bucket, or not: one bucket left pageable is a slower copy for its batches.
        self.pinned_buckets = tuple(pinned_buckets)
        self.pinned = len(pinned_buckets) == len(self.buckets)

    def _slot(self, size: int, graph_id: int, pinned: bool, shared_lock: threading.Lock | None) -> tuple[_Slot, bool]:
        """One bucket's buffers, bound once; and whether its host staging is page-locked."""
        host_in, locked = host_buffer((size, IMAGE_PIXELS), self.dtype, pinned)
        host_in.fill(0)
        binding = self.session.io_binding()
        if self.device == "cpu":
            host_out = np.zeros((size, NUM_CLASSES), dtype=np.float32)
            device_in = None
            # ortvalue_from_numpy borrows the array: writing host_in is writing the bound input.
            binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(host_in))
            out = ort.OrtValue.ortvalue_from_numpy(host_out)
        else:
            host_out = None
            device_in = ort.OrtValue.ortvalue_from_shape_and_type(
                [size, IMAGE_PIXELS], self.dtype.type, "cuda", self.device_id
            )
            device_in.update_inplace(host_in)
            binding.bind_ortvalue_input(self.input_name, device_in)
            out = ort.OrtValue.ortvalue_from_shape_and_type([size, NUM_CLASSES], np.float32, "cuda", self.device_id)
        binding.bind_ortvalue_output(self.output_name, out)
        run_options = ort.RunOptions()
        if self.cuda_graphs:
            # One captured graph per bucket shape; ids start at 1 (0 is onnxruntime's own default).
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        lock = shared_lock or threading.Lock()
        return _Slot(size, host_in, host_out, device_in, out, binding, run_options, lock), locked

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 10) for N images of this session's dtype; batches above the largest bucket in chunks."""
        largest = self.buckets[-1]
        if len(images) > largest:
            return np.concatenate([self.run(images[i : i + largest]) for i in range(0, len(images), largest)])
        n = len(images)
        slot = self._slots[bucket_for(max(n, 1), self.buckets)]
        with slot.lock:
            # Rows n: keep whatever the previous batch left: every row is computed independently and dropped.
            np.copyto(slot.host_in[:n], images, casting="same_kind")
            if slot.device_in is not None:
                slot.device_in.update_inplace(slot.host_in)  # one host->device copy of the bucket
            self.session.run_with_iobinding(slot.binding, slot.run_options)
            if slot.host_out is not None:
                return slot.host_out[:n].copy()
            return slot.out.numpy()[:n]  # one device->host copy of the bucket's output

    def warm_up(self) -> None:
        """Run every bucket (four times with CUDA graphs: onnxruntime runs, captures, then replays the graph)."""
        for size in self.buckets:
            for _ in range(4 if self.cuda_graphs else 1):
                self.run(np.zeros((size, IMAGE_PIXELS), dtype=self.dtype))
