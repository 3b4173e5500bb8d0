"""What a benchmark run measures: the suite, the device, and key=value settings on top of a shape preset.

    sparsify bench --suite ffn shapes=paper            # a preset (per suite: tiny, small, paper, quick)
    sparsify bench --suite cpu tokens=128 nnz=29,56    # lists are comma-separated
    sparsify bench --suite model sparsity=0.99 layers=4 decode=1,8,64 graphs=false
    sparsify bench --suite train nnz=29 tokens=16384 width=128
    sparsify bench --suite policy shapes=quick         # this GPU's dense/sparse crossover, saved as its rule

A preset fills every setting; a key given on the command line replaces the preset's value. The presets and the
keys live here and nowhere else (the CLI only passes the words on). Unknown keys, values of the wrong type and
settings a suite cannot use stop the run before any work, naming what would be valid.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from sparsify_cli.errors import UserError

SUITES = ("cpu", "ffn", "model", "train", "policy")
DEVICES = ("cpu", "cuda")

# The train suite's λ: its loss is ⟨out, gy⟩ + λ·l1 with gy ~ N(0, 1)/M, the gradient of a token-mean loss such
# as the trainer's CE; at λ = 1 the L1 term's share of ∂L/∂h (λ/M per active pair) is about that of the output's
# (‖Down[:, j]‖/M ≈ 0.9/M at D = 2048), so the error check covers both. The time does not depend on λ.
TRAIN_L1 = 1.0

# Per suite: the presets and their values. CPU_DEFAULT names a suite's default preset on the CPU, GPU_DEFAULT on a
# GPU.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU suite: pure-torch sparse FFN (formats.sparse_ffn) vs three dense matmuls, fp32.
    "cpu": {
        "paper": dict(d_model=2048, d_ffn=5632, tokens=(128,), decode=(1,), nnz=(29.0, 56.0), reps=20, warmup=2),
        "small": dict(d_model=512, d_ffn=1408, tokens=(64,), decode=(1,), nnz=(7.0, 14.0), reps=20, warmup=2),
        "tiny": dict(d_model=64, d_ffn=256, tokens=(16,), decode=(1,), nnz=(8.0,), reps=3, warmup=1, threads=1),
    },
    # FFN suite on the GPU: bench/ffn.py's rows (D 2048, H 5632; PERFORMANCE.md's inputs), bf16.
    "ffn": {
        "paper": dict(d_model=2048, d_ffn=5632, tokens=(16384, 65536), decode=(1, 8, 16, 64),
                      nnz=(29.0, 56.0, 112.0),
                      reps=30, warmup=5),
        "quick": dict(d_model=2048, d_ffn=5632, tokens=(4096,), decode=(1, 64), nnz=(29.0, 112.0), reps=20, warmup=5),
    },
    # Whole model: synthetic weights (or a checkpoint / packed dir), prefill, a training step, decode.
    "model": {
        "tiny": dict(d_model=128, d_ffn=512, layers=2, heads=4, vocab=1024, seq_len=64, batch=4, train_batch=4,
                     decode=(1, 8, 64), context=16, sparsity=0.98, reps=5, warmup=1, threads=1),
        "small": dict(d_model=512, d_ffn=1408, layers=4, heads=8, vocab=8192, seq_len=256, batch=4, train_batch=4,
                      decode=(1, 8, 64), context=64, sparsity=0.99, reps=10, warmup=2),
        # 16 × 2048 prefill tokens and a 2 × 2048-token training step fit an 80 GB GPU beside both models; so do
        # the two models' KV caches for 64 sequences of 512 positions (~7.5 GB each in bf16).
        "paper": dict(d_model=2048, d_ffn=5632, layers=28, heads=32, vocab=32000, seq_len=2048, batch=16,
                      train_batch=2, decode=(1, 2, 4, 8, 16, 32, 64), context=512, sparsity=0.995, reps=20,
                      warmup=3),
    },
    # FFN forward + backward with the L1 term, dense torch autograd vs kernels.train_reference.sparse_ffn_train
    # (bench/train_ffn.py): PERFORMANCE.md's training shape and inputs; the small presets run the torch reference
    # on the CPU. Densities of the small ones are the paper preset's (0.5%, 1%, 2% of H).
    "train": {
        "paper": dict(d_model=2048, d_ffn=5632, tokens=(16384,), nnz=(29.0, 56.0, 112.0), reps=20, warmup=3,
                      l1_coeff=TRAIN_L1),
        "quick": dict(d_model=2048, d_ffn=5632, tokens=(4096,), nnz=(29.0, 112.0), reps=10, warmup=2,
                      l1_coeff=TRAIN_L1),
        "small": dict(d_model=256, d_ffn=1024, tokens=(1024,), nnz=(5.0, 10.0, 20.0), reps=5, warmup=1,
                      l1_coeff=TRAIN_L1),
        "tiny": dict(d_model=64, d_ffn=256, tokens=(64,), nnz=(4.0, 8.0), reps=3, warmup=1, threads=1,
                     l1_coeff=TRAIN_L1),
    },
    # This GPU's dense/sparse crossover (bench/policy.py), written as its policy file (kernels/device_policy.py):
    # prefill densities as nnz= at tokens= (> 64 each), decode at bench/policy.py's DECODE_DENSITIES for decode=
    # (16: the fused kernels' largest size, 64: the two-kernel path's). paper: the sweep behind SparsePolicy's
    # defaults (BENCHMARKS.md); quick: fewer, smaller points (about a minute).
    "policy": {
        "paper": dict(d_model=2048, d_ffn=5632, tokens=(16384,), decode=(16, 64),
                      nnz=(16.0, 29.0, 40.0, 48.0, 56.0, 72.0, 96.0), reps=20, warmup=5),
        "quick": dict(d_model=2048, d_ffn=5632, tokens=(4096,), decode=(16, 64), nnz=(16.0, 29.0, 42.0, 56.0, 96.0),
                      reps=10, warmup=3),
    },
}
GPU_DEFAULT = {"cpu": "paper", "ffn": "paper", "model": "paper", "train": "paper", "policy": "paper"}
CPU_DEFAULT = {"cpu": "paper", "ffn": "paper", "model": "tiny", "train": "small", "policy": "paper"}


@dataclass
class BenchSettings:
    """Every setting of a run (the preset's values with the command line's on top)."""

    suite: str
    device: str
    shapes: str
    d_model: int = 0
    d_ffn: int = 0
    tokens: tuple[int, ...] = ()  # prefill tokens per call (cpu, ffn)
    decode: tuple[int, ...] = ()  # decode batch sizes (tokens per call)
    context: int = 0  # model: tokens already in each sequence's KV cache when a decode step runs
    nnz: tuple[float, ...] = ()  # target active neurons per token (cpu, ffn)
    layers: int = 0
    heads: int = 0
    vocab: int = 0
    seq_len: int = 0
    batch: int = 0  # prefill sequences (model)
    train_batch: int = 0  # training-step sequences (model)
    sparsity: float = 0.0  # target FFN activation sparsity of synthetic model weights
    reps: int = 0
    warmup: int = 0
    threads: int = 0  # torch intra-op threads on the CPU; 0: torch's default
    seed: int = 0
    detail: bool = True  # ffn suite: also bench/ffn.py's per-kernel timings (prefill_row/decode_row)
    width: int = 0  # train, model: ELL width of the sparse training op; 0: train/ffn_kernels.ell_width
    # model: on a GPU, also time each decode step as CUDA-graph replays ("decode (graphs)" rows): eager decode keeps
    # the packed FFNs on their dense path (kernels/ffn.py), under a graph they run the sparse kernels. CPU: skipped.
    graphs: bool = True
    # model: compile the training step's decoder blocks and loss (train.compile, train/compile.py), both copies
    compile: bool = False
    backend: str = ""  # train: the sparse_ffn_train backend (cuda, torch); "": cuda on a GPU, torch on the CPU
    l1_coeff: float = 0.0  # train: λ of the loss ⟨out, gy⟩ + λ·l1 (TRAIN_L1 explains the presets' value)
    given: tuple[str, ...] = field(default=())  # the keys set on the command line

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


_KEYS = {f.name: f for f in dataclasses.fields(BenchSettings) if f.name not in ("suite", "device", "given")}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*=")
# Keys that mean something per suite (the others are refused, so a typo is not silently ignored).
SUITE_KEYS = {
    "cpu": {"shapes", "d_model", "d_ffn", "tokens", "decode", "nnz", "reps", "warmup", "threads", "seed"},
    "ffn": {"shapes", "tokens", "decode", "nnz", "reps", "warmup", "seed", "detail"},
    "model": {"shapes", "d_model", "d_ffn", "layers", "heads", "vocab", "seq_len", "batch", "train_batch", "decode",
              "context", "sparsity", "reps", "warmup", "threads", "seed", "width", "graphs", "compile"},
    "train": {"shapes", "d_model", "d_ffn", "tokens", "nnz", "reps", "warmup", "threads", "seed", "width", "backend",
              "l1_coeff"},
    "policy": {"shapes", "d_model", "d_ffn", "tokens", "decode", "nnz", "reps", "warmup", "seed"},
}
TRAIN_BACKEND_CHOICES = ("cuda", "torch")


def is_override(arg: str) -> bool:
    return bool(_OVERRIDE.match(arg))


def _parse(key: str, text: str) -> Any:
    kind = _KEYS[key].type
    try:
        if "tuple[int" in str(kind):
            return tuple(int(v) for v in text.split(",") if v.strip())
        if "tuple[float" in str(kind):
            return tuple(float(v) for v in text.split(",") if v.strip())
        if kind in ("int", int):
            return int(text)
        if kind in ("float", float):
            return float(text)
        if kind in ("bool", bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return text
    except ValueError:
        want = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(str(kind), "a comma-separated list")
        raise UserError(f"{key}={text!r}: expected {want}") from None


def resolve(suite: str, device: str, overrides: list[str]) -> BenchSettings:
    """The settings of a run: the suite's preset (``shapes=`` or the device's default) plus the overrides."""
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    values: dict[str, Any] = {}
    for arg in overrides:
        key, _, text = arg.partition("=")
        if key not in _KEYS:
            raise UserError(f"unknown setting {key!r}; the {suite} suite takes: {', '.join(sorted(SUITE_KEYS[suite]))}")
        if key not in SUITE_KEYS[suite]:
            raise UserError(f"{key}= does not apply to the {suite} suite; it takes: {', '.join(sorted(SUITE_KEYS[suite]))}")
        values[key] = _parse(key, text) if key != "shapes" else text
    presets = PRESETS[suite]
    shapes = values.get("shapes") or (GPU_DEFAULT if device == "cuda" else CPU_DEFAULT)[suite]
    if shapes not in presets:
        raise UserError(f"shapes={shapes!r} is not a preset of the {suite} suite; choose one of: {', '.join(presets)}")
    merged = {**presets[shapes], **{k: v for k, v in values.items() if k != "shapes"}}
    s = BenchSettings(suite=suite, device=device, shapes=shapes, given=tuple(values), **merged)
    _check(s)
    return s


def _check(s: BenchSettings) -> None:
    def positive(name: str, value, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise UserError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")

    for name in ("reps", "d_model", "d_ffn"):
        positive(name, getattr(s, name))
    positive("warmup", s.warmup, allow_zero=True)
    positive("threads", s.threads, allow_zero=True)
    positive("width", s.width, allow_zero=True)
    positive("l1_coeff", s.l1_coeff, allow_zero=True)
    for name in ("tokens", "decode"):
        for v in getattr(s, name):
            positive(name, v)
    for v in s.nnz:
        if not 0 < v < 0.35 * s.d_ffn:
            raise UserError(f"nnz={v:g} is not reachable with d_ffn={s.d_ffn} (PERFORMANCE.md's inputs: 30% of neurons "
                            f"dead, rates capped at 0.5, so 0 < nnz < {0.35 * s.d_ffn:g})")
    if s.suite == "model":
        for name in ("layers", "heads", "vocab", "seq_len", "batch", "train_batch"):
            positive(name, getattr(s, name))
        if not 0 <= s.context < s.seq_len:
            raise UserError(f"context={s.context} must be in [0, seq_len={s.seq_len}): the decode step's cached tokens")
        if not 0.65 < s.sparsity < 1.0:
            raise UserError(f"sparsity={s.sparsity:g} must be between 0.65 and 1 (e.g. 0.99: 1% of neurons active; "
                            "PERFORMANCE.md's rates leave 30% of neurons dead and cap the others at 0.5)")
        if s.d_model % s.heads or (s.d_model // s.heads) % 2:
            raise UserError(f"d_model={s.d_model} must split into heads={s.heads} heads of an even width")
    if s.suite == "train":
        if s.backend and s.backend not in TRAIN_BACKEND_CHOICES:
            raise UserError(f"backend={s.backend!r} is not a training backend; choose one of: "
                            f"{', '.join(TRAIN_BACKEND_CHOICES)}")
        if s.backend == "cuda" and s.device != "cuda":
            raise UserError("backend=cuda is the CUDA training op: it needs --device cuda (on the CPU the suite "
                            "runs backend=torch, the pure-torch reference)")
        if not s.backend:
            s.backend = "cuda" if s.device == "cuda" else "torch"
        if not s.tokens or not s.nnz:
            raise UserError("the train suite needs tokens= and nnz= (at least one value each)")
    if s.suite == "policy":
        from sparsify_cli.kernels.ffn import DEFAULT_POLICY

        limit = DEFAULT_POLICY.decode_max_m
        if s.d_model % 64:
            raise UserError(f"d_model={s.d_model} must be a multiple of 64 (the kernels' tile)")
        if any(m <= limit for m in s.tokens) or any(m > limit for m in s.decode):
            raise UserError(f"tokens= are prefill sizes (each > {limit}) and decode= decode sizes (each <= {limit}): "
                            f"got tokens={list(s.tokens)}, decode={list(s.decode)}")
        if not (s.tokens and s.nnz) and not s.decode:
            raise UserError("the policy suite needs tokens= with nnz=, or decode= (at least one point)")
    if s.suite == "ffn" and ("d_model" in s.given or "d_ffn" in s.given):  # pragma: no cover - refused above
        raise UserError("the ffn suite's GPU rows use D=2048, H=5632 (bench/ffn.py)")
