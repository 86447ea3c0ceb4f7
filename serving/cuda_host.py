"""Can this host run CUDA at all? The NVIDIA driver's own answer, before onnxruntime is asked (standard library only:
deploy/docker/requirements.py uses it to choose the onnxruntime build before any package is installed).

A GPU that `nvidia-smi -L` lists is not enough: a container started without the NVIDIA runtime has no
libcuda.so.1, and a driver older than the CUDA that onnxruntime-gpu was built for cannot run it. onnxruntime
itself then only drops its CUDA provider with a warning, or (with CPU fallback disabled) fails with a message
that names neither cause; this module names the cause and the remedies.
"""

from __future__ import annotations

import ctypes

# onnxruntime-gpu 1.31 is built against CUDA 13.0 (pyproject.toml's `cuda` extra); its driver must support it.
REQUIRED_CUDA = (13, 0)
REQUIRED_DRIVER = "580"  # the first NVIDIA driver branch that supports CUDA 13.0 on Linux
REMEDIES = (
    "serve on the CPU (DEVICE=cpu for make, --device cpu for the server), or give this host a usable NVIDIA "
    f"driver (CUDA {REQUIRED_CUDA[0]}.{REQUIRED_CUDA[1]} or newer: driver {REQUIRED_DRIVER}+; in a container, the "
    "NVIDIA container runtime: `docker run --gpus all`, or the NVIDIA device plugin on Kubernetes)"
)
_CUDA_SUCCESS = 0
_CUDA_ERRORS = {
    100: "no CUDA-capable device is detected (CUDA_ERROR_NO_DEVICE: are /dev/nvidia* in this container?)",
    35: "the driver is older than the CUDA runtime (CUDA_ERROR_INSUFFICIENT_DRIVER)",
    999: "unknown error (CUDA_ERROR_UNKNOWN: often a driver/kernel-module version mismatch)",
}


def driver_problem(library: str = "libcuda.so.1") -> str | None:
    """Why CUDA cannot run here (the library that failed to load, or the driver's CUDA version), or None."""
    try:
        cuda = ctypes.CDLL(library)
    except OSError as exc:
        return f"{library}, the NVIDIA driver's CUDA library, cannot be loaded ({exc})"
    rc = cuda.cuInit(0)
    if rc != _CUDA_SUCCESS:
        return f"the NVIDIA driver cannot initialise CUDA: cuInit returned {rc}: {_CUDA_ERRORS.get(rc, 'see CUresult')}"
    version = ctypes.c_int(0)
    rc = cuda.cuDriverGetVersion(ctypes.byref(version))
    if rc != _CUDA_SUCCESS:
        return f"the NVIDIA driver does not report its CUDA version: cuDriverGetVersion returned {rc}"
    supported = (version.value // 1000, version.value % 1000 // 10)
    if supported < REQUIRED_CUDA:
        return (
            f"the NVIDIA driver supports CUDA {supported[0]}.{supported[1]}, and onnxruntime-gpu needs CUDA "
            f"{REQUIRED_CUDA[0]}.{REQUIRED_CUDA[1]} (driver {REQUIRED_DRIVER} or newer)"
        )
    return None


def explain(problem: str) -> str:
    """The problem with its remedies, for a warning or an error."""
    return f"CUDA cannot run here: {problem}. Remedies: {REMEDIES}"
