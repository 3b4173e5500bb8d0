"""Energy per token from NVML's total-energy counter (NVIDIA GPUs, Volta and newer; pynvml optional).

nvmlDeviceGetTotalEnergyConsumption counts millijoules since the driver loaded; the counter moves in steps
(tens of ms), so a measurement runs the workload for at least ``min_seconds`` and divides by the tokens done.
Whatever goes wrong (no pynvml, no NVIDIA GPU, a counter the GPU does not support) becomes a note in the
report, never an error: energy is an extra, not a reason to fail a benchmark.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch


class EnergyMeter:
    """``meter.available`` says whether energy can be read; ``meter.note`` says why not (or which GPU)."""

    def __init__(self, device: torch.device | str):
        self.handle = None
        self.note = ""
        if torch.device(device).type != "cuda":
            self.note = "energy: NVML counter is for NVIDIA GPUs; not measured on the CPU"
            return
        nvml, handle, self.note = open_nvml(device, "energy: not measured")
        if handle is None:
            return
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where the GPU lacks the counter
            self._nvml, self.handle = nvml, handle
            self.note = "energy: NVML total-energy counter (whole GPU, idle power included)"
        except Exception as exc:  # noqa: BLE001 - any NVML failure is a note
            self.note = f"energy: not measured (NVML: {type(exc).__name__}: {exc})"

    @property
    def available(self) -> bool:
        return self.handle is not None

    def read_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def mj_per_token(self, fn: Callable[[], object], tokens: int, est_ms: float,
                     min_seconds: float = 1.0) -> Optional[float]:
        """Run fn repeatedly for >= min_seconds (from its measured median ``est_ms``); mJ per token, or None."""
        if not self.available:
            return None
        reps = max(10, int(min_seconds * 1e3 / max(est_ms, 1e-3)) + 1)
        try:
            torch.cuda.synchronize()
            e0, t0 = self.read_mj(), time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            e1, t1 = self.read_mj(), time.perf_counter()
        except Exception as exc:  # noqa: BLE001
            self.note = f"energy: not measured (NVML failed during the run: {exc})"
            self.handle = None
            return None
        if e1 <= e0 or t1 - t0 <= 0:
            return None
        return (e1 - e0) / (reps * tokens)


def open_nvml(device: torch.device | str, unavailable: str, nvml=None) -> tuple[Any, Any, str]:
    """(pynvml, the NVML handle of torch's CUDA ``device``, "") or (None, None, a note "<unavailable> (why)"):
    pynvml missing or NVML failing is a note for the report, never an error. ``nvml``: a stand-in module (tests)."""
    device = torch.device(device)
    try:
        if nvml is None:
            import pynvml as nvml
    except ImportError:
        return None, None, f"{unavailable} (pynvml is not installed: pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return nvml, nvml_handle(nvml, index), ""
    except Exception as exc:  # noqa: BLE001 - any NVML failure is a note
        return None, None, f"{unavailable} (NVML: {type(exc).__name__}: {exc})"


def nvml_handle(pynvml, index: int):
    """The NVML handle of torch's device ``index`` (by UUID: CUDA_VISIBLE_DEVICES may renumber devices)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - fall back to the index
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)
