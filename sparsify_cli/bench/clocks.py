"""The GPU's clocks while a benchmark runs: NVML sampled in a background thread (NVIDIA GPUs; pynvml optional).

A long benchmark can hold a GPU at its power limit, and the driver then lowers the SM clock: an H200 running the
ffn suite spent its busy time at a median 1680 of its 1980 MHz (BENCHMARKS.md, session 15), so the suite's
milliseconds sat ~10% above those of short runs of the same kernels. Dense and sparse are timed in turns within
each repetition (measure.py), so they share the clock and the ratios hold; the report records the clock so that
absolute times can be compared across runs and machines. Each row gets the median and lowest SM clock of its busy
samples and the share of them the driver marked as power-capped; the header gets the run's summary.
Whatever goes wrong (no pynvml, no NVIDIA GPU, a query the GPU does not support) becomes a note, never an error,
as in energy.py: clocks are context for the numbers, not a reason to fail a benchmark.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sparsify_cli.bench.energy import open_nvml

PERIOD_S = 0.1  # NVML's clock and power readings are themselves averaged over ~0.1-1 s
BUSY_UTIL = 50  # % of the last sample period a kernel ran: below it the GPU waits on the host (setup, checks)
# Clock-event reasons (nvml.h): the driver lowered the clock to stay under the power limit (software cap, or the
# hardware power brake). Literal values: older pynvml releases name them nvmlClocksThrottleReason*.
POWER_REASONS = 0x4 | 0x80


@dataclass
class Sample:
    t: float  # time.monotonic()
    sm_mhz: int
    power_w: float
    util: int  # %
    reasons: int  # bit mask (POWER_REASONS)


def summarize(samples: list[Sample]) -> dict:
    """sm_mhz_median, sm_mhz_min, power_w_max and power_capped_share over the busy samples (all samples when none
    is busy); {} without samples."""
    if not samples:
        return {}
    busy = [s for s in samples if s.util >= BUSY_UTIL] or samples
    mhz = [s.sm_mhz for s in busy]
    return {"sm_mhz_median": float(statistics.median(mhz)), "sm_mhz_min": min(mhz),
            "power_w_max": max(s.power_w for s in busy),
            "power_capped_share": sum(1 for s in busy if s.reasons & POWER_REASONS) / len(busy)}


class ClockWatch:
    """``watch.available`` says whether clocks can be read, ``watch.note`` why not. ``watch.wrap(run)`` returns a
    row callable that adds the row's clock summary to its dict; ``watch.finish()`` stops the sampling and says what
    the clocks were over the whole run."""

    def __init__(self, device: torch.device | str, nvml=None, period_s: float = PERIOD_S):
        self.note = ""
        self.max_mhz: Optional[int] = None
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._period = period_s
        self._nvml = self._handle = None
        if torch.device(device).type != "cuda":
            return
        nvml, handle, self.note = open_nvml(device, "clocks: not recorded", nvml)
        if handle is None:
            return
        try:
            self.max_mhz = int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
            self._nvml, self._handle = nvml, handle
            self._sample()  # raises here, not in the thread, where a query is not supported
        except Exception as exc:  # noqa: BLE001 - any NVML failure is a note
            self._nvml = self._handle = None
            self.note = f"clocks: not recorded (NVML: {type(exc).__name__}: {exc})"

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _sample(self) -> Sample:
        nv, h = self._nvml, self._handle
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return Sample(time.monotonic(), int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                      nv.nvmlDeviceGetPowerUsage(h) / 1e3, int(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                      int(reasons_fn(h)))

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                s = self._sample()
            except Exception as exc:  # noqa: BLE001 - the driver went away mid-run: keep what was sampled
                self.note = f"clocks: sampling stopped (NVML: {type(exc).__name__}: {exc})"
                return
            with self._lock:
                self._samples.append(s)

    def _start(self) -> None:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sparsify-clocks", daemon=True)
            self._thread.start()

    def _between(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if t0 <= s.t <= t1]

    def wrap(self, run: Callable[[], dict]) -> Callable[[], dict]:
        """``run`` with its row's clock summary added (the row unchanged where clocks are not recorded)."""
        if not self.available:
            return run

        def timed() -> dict:
            self._start()
            t0 = time.monotonic()
            row = run()
            return {**row, **summarize(self._between(t0, time.monotonic()))}

        return timed

    def finish(self) -> tuple[dict, list[str]]:
        """Stop sampling; the run's summary (with the GPU's top SM clock) for the report's header, and its note."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self._period + 1)
        if not self.available:
            return {}, [self.note] if self.note else []
        with self._lock:
            summary = summarize(self._samples)
        if not summary:
            return {}, [self.note or "clocks: no samples (the run was shorter than one sampling period)"]
        line = (f"clocks: SM {summary['sm_mhz_median']:.0f} MHz median while busy ({summary['sm_mhz_min']} lowest, "
                f"{self.max_mhz} top), power-capped in {100 * summary['power_capped_share']:.0f}% of busy samples, "
                f"up to {summary['power_w_max']:.0f} W; dense and sparse take turns, so they share the clock")
        return {"clocks": {**summary, "sm_mhz_max": self.max_mhz}}, [line] + ([self.note] if self.note else [])
