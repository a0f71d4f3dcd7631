"""Which device a rank computes on, and the dtype it defaults to there.

Callers: the CLI validates ``--device`` / ``--dtype`` at start (:func:`resolve_device`,
:func:`resolve_dtype`); every rank picks its own device with :func:`rank_device` (rank ``r`` of
a host uses ``cuda:<local rank>``); the collectives backend comes from :func:`backend_for`.

* ``auto``: CUDA when ``torch.cuda.is_available()``, else CPU.
* ``cuda``: CUDA, or :class:`DeviceUnavailable` at start on a machine without one.
* ``cpu``: CPU even when a GPU is present.

Default dtypes: bf16 on CUDA (what serving systems run; Tensor Cores), fp32 on CPU (the exact
path every parity check against ``transformers`` relies on). ``--dtype`` overrides either.
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cuda", "cpu")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


class DeviceUnavailable(ValueError):
    """The requested device does not exist on this machine (raised at start, never mid-request;
    a ``ValueError`` so the CLI prints it as a flag error)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``torch.device("cuda")`` or ``torch.device("cpu")`` for ``auto|cuda|cpu``.

    Raises ``ValueError`` for another name and :class:`DeviceUnavailable` for ``cuda`` without
    a usable CUDA device (the message says what torch sees and how to fall back)."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        build = torch.version.cuda or "none (a CPU-only torch build)"
        raise DeviceUnavailable(
            f"--device cuda was asked for, but torch sees no CUDA device (torch {torch.__version__}, "
            f"CUDA runtime {build}); use --device cpu or --device auto, or install a CUDA build of torch")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and has_cuda) else "cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name a model runs in: ``name`` itself, or for ``auto`` bf16 on CUDA and fp32 on CPU."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the rank with index ``local_rank`` on its host: ``cuda:<local_rank>`` or CPU.

    Raises :class:`DeviceUnavailable` when the host has fewer GPUs than ranks to place."""
    if device.type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceUnavailable(f"local rank {local_rank} needs cuda:{local_rank}, but this host has "
                                f"{count} CUDA device(s): start fewer ranks per host (--nproc-per-node)")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """``torch.distributed`` backend for the tensors of a rank on ``device``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
