"""The GPU's clocks beside the benchmark rows (bench/clocks.py), with a scripted NVML in place of the driver."""

import time

import pytest

from sparsify_cli.bench import energy
from sparsify_cli.bench.clocks import ClockWatch, Sample, summarize


class FakeNVML:
    """The NVML calls clocks.py makes; readings come from a script of (sm MHz, util %, reasons), the last repeated.
    Only the older name of the reasons query, as older pynvml releases have it."""

    NVML_CLOCK_SM = 1

    def __init__(self, script, fail_on=None):
        self.script, self.i, self.fail_on = list(script), 0, fail_on

    def nvmlInit(self):
        pass

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def _now(self):
        return self.script[min(self.i, len(self.script) - 1)]

    def nvmlDeviceGetClockInfo(self, h, kind):
        self.i += 1
        return self._now()[0]

    def nvmlDeviceGetPowerUsage(self, h):
        return 650_000  # mW

    def nvmlDeviceGetUtilizationRates(self, h):
        if self.fail_on == "util":
            raise RuntimeError("Not Supported")
        return type("Util", (), {"gpu": self._now()[1]})()

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._now()[2]


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(energy, "nvml_handle", lambda nvml, index: "handle")


def test_summary_is_over_busy_samples():
    idle = Sample(0.0, 1980, 80.0, 0, 0)
    busy = [Sample(1.0, 1700, 690.0, 100, 0x4), Sample(1.1, 1600, 700.0, 95, 0x4), Sample(1.2, 1900, 500.0, 60, 0)]
    s = summarize([idle, *busy])
    assert s == {"sm_mhz_median": 1700.0, "sm_mhz_min": 1600, "power_w_max": 700.0,
                 "power_capped_share": pytest.approx(2 / 3)}
    assert summarize([idle])["sm_mhz_median"] == 1980.0  # nothing busy: every sample counts
    assert summarize([]) == {}


def test_cpu_records_nothing_and_leaves_rows_alone():
    watch = ClockWatch("cpu")
    run = lambda: {"dense_ms": 1.0}  # noqa: E731
    assert not watch.available and watch.wrap(run) is run
    assert watch.finish() == ({}, [])


def test_rows_get_their_clocks_and_the_header_the_runs(fake_gpu):
    nvml = FakeNVML([(1980, 0, 0)] + [(1680, 100, 0x4)] * 6 + [(1365, 100, 0x80)] * 2 + [(1980, 100, 0)])
    watch = ClockWatch("cuda:0", nvml=nvml, period_s=0.01)
    assert watch.available and watch.max_mhz == 1980

    def row():
        time.sleep(0.3)
        return {"dense_ms": 2.0}

    out = watch.wrap(row)()
    header, notes = watch.finish()
    assert out["dense_ms"] == 2.0 and 1365 <= out["sm_mhz_min"] <= out["sm_mhz_median"] <= 1980
    assert 0 < out["power_capped_share"] <= 1 and out["power_w_max"] == 650.0
    assert header["clocks"]["sm_mhz_max"] == 1980 and header["clocks"]["sm_mhz_min"] == 1365
    assert notes[0].startswith("clocks: SM ") and "1980 top" in notes[0] and "power-capped in" in notes[0]
    n = nvml.i
    time.sleep(0.05)
    assert nvml.i == n  # finish() stopped the sampling


def test_a_query_the_gpu_lacks_is_a_note_not_an_error(fake_gpu):
    watch = ClockWatch("cuda:0", nvml=FakeNVML([(1980, 0, 0)], fail_on="util"))
    run = lambda: {"dense_ms": 1.0}  # noqa: E731
    assert not watch.available and watch.wrap(run) is run
    assert watch.note == "clocks: not recorded (NVML: RuntimeError: Not Supported)"
    assert watch.finish() == ({}, [watch.note])


def test_without_pynvml_the_note_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    watch = ClockWatch("cuda:0")
    assert not watch.available and "pip install nvidia-ml-py" in watch.note
