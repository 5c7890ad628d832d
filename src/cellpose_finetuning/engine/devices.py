"""Say so when a GPU is there but torch cannot use it.

Without this, a CPU-only torch (or a CUDA build too new for the driver) on a GPU
machine falls back to the CPU silently, 14-20x slower. The check looks for a GPU
the cheap way first (device files, ``nvidia-smi``) and only then asks torch.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence

__all__ = ["GpuUnusedWarning", "gpu_signs", "unused_gpu_reason", "warn_if_gpu_unused"]

log = logging.getLogger(__name__)

#: files whose presence means an NVIDIA (or AMD ROCm) GPU and its driver are installed
GPU_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd")


class GpuUnusedWarning(UserWarning):
    """A GPU is present, but torch runs on the CPU."""


def gpu_signs() -> list[str]:
    """What suggests a GPU on this machine (empty when nothing does)."""
    signs = [path for path in GPU_FILES if os.path.exists(path)]
    if sys.platform != "darwin" and shutil.which("nvidia-smi"):
        signs.append("nvidia-smi")
    return signs


def unused_gpu_reason(signs: Sequence[str] | None = None) -> str | None:
    """Why torch cannot use the GPU this machine has, or None (no GPU, or it is used).

    Parameters
    ----------
    signs : sequence of str, optional
        What shows a GPU; :func:`gpu_signs` by default.
    """
    signs = gpu_signs() if signs is None else list(signs)
    if not signs:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = f"{build} is a CPU-only build"
    else:
        runtime = torch.version.cuda or f"ROCm {torch.version.hip}"
        try:
            torch.cuda.init()
            detail = "no device is visible (CUDA_VISIBLE_DEVICES?)"
        except Exception as exc:  # torch says why: old driver, no device, ...
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = f"{build} (CUDA {runtime}) cannot use it: {detail}"
    return (
        f"a GPU is present ({', '.join(signs)}) but {why}. Training and inference run on "
        "the CPU, 14-20x slower. Install a torch build for your driver: see the README, "
        "'Installing' > 'GPU'."
    )


@functools.cache
def warn_if_gpu_unused() -> str | None:
    """Warn once per process (a :class:`GpuUnusedWarning` and a log line); return the text."""
    reason = unused_gpu_reason()
    if reason:
        log.warning(reason)
        warnings.warn(reason, GpuUnusedWarning, stacklevel=2)
    return reason
