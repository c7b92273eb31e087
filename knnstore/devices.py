"""Where the model runs and in which float type: ``--device`` and ``--compute-dtype``.

``auto`` picks a CUDA GPU when torch sees one (the first), else Apple's MPS, else the CPU.
On an accelerator the model runs in bfloat16 (float16 where the GPU has no bfloat16, and
on MPS); on the CPU in float32. Keys are stored in the store's dtype whatever the compute
dtype, so a store built on a GPU is searched on a CPU and the other way round (the keys of
one text agree within the reduced dtype's rounding: docs/scale-out.md has the figures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where a device is resolved (commands without a model need none)
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # as --help shows them
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # torch's names for them


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``spec`` names (None and "auto": the best one present), refused
    with a one-line InputError when it is malformed or not on this machine."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {spec!r}: use one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {spec!r}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        index = 0 if device.index is None else device.index
        if index >= count:
            raise InputError(f"device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise InputError(f"device {spec!r}: torch has no MPS backend here; use --device cpu (or auto)")
        return device
    if device.type == "cpu":
        return torch.device("cpu")
    raise InputError(f"device {spec!r} is not supported: use one of {', '.join(DEVICE_CHOICES)}")


def resolve_compute_dtype(device: torch.device, spec: str | torch.dtype | None = "auto") -> torch.dtype:
    """The float type the model runs in on ``device`` ("auto": float32 on the CPU, bfloat16
    on a GPU that has it, else float16; a torch dtype given is taken as it is)."""
    import torch

    if isinstance(spec, torch.dtype):
        if spec not in [getattr(torch, name) for name in COMPUTE_DTYPES]:
            raise InputError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {spec}")
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if spec not in COMPUTE_DTYPES:
        raise InputError(f"compute dtype must be auto or one of {', '.join(COMPUTE_DTYPES)}, got {spec!r}")
    return getattr(torch, spec)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator running out of memory (torch raises RuntimeError
    subclasses with the words in them)."""
    import torch

    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
