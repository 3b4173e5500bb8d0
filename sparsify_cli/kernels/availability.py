"""Can the CUDA kernels run here, and if not, why not (one line, for `kernels=cuda` errors)."""

from __future__ import annotations

import functools

MIN_CAPABILITY = (8, 0)  # bf16 and the instructions the kernels use; sm_90a extras are chosen per device


@functools.lru_cache(maxsize=None)
def cuda_kernels_status() -> tuple[bool, str]:
    """(True, "ok: <device>") when the CUDA path can run, else (False, reason)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return False, (
            f"GPU compute capability {major}.{minor} is older than the {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            "the kernels need"
        )
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); install the `gpu` extra (cupy-cuda13x)"
    return True, f"ok: {torch.cuda.get_device_name()} (sm_{major}{minor})"


def resolve_backend(kernels: str) -> str:
    """Map the `kernels` option ("auto", "cuda", "torch") to the backend that will run: "cuda" or "torch".

    "cuda" raises UserError with the reason when the CUDA path cannot run; "auto" falls back to torch.
    """
    from sparsify_cli.errors import UserError

    if kernels == "torch":
        return "torch"
    if kernels not in ("auto", "cuda"):
        raise UserError(f"kernels must be one of auto, cuda, torch; got {kernels!r}")
    ok, why = cuda_kernels_status()
    if ok:
        return "cuda"
    if kernels == "cuda":
        raise UserError(f"kernels=cuda cannot run here: {why}")
    return "torch"
