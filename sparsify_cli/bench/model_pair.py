"""The two models of the whole-model suite (bench/model.py): a dense model and its packed (sparse-FFN) twin.

Where the two models come from:
- a packed dir (`sparsify pack`): sparse = load_packed(); dense = its dense twin, the packed weights put back at
  the source width (pruned neurons as zero rows), so both compute the same function and only the FFN path differs;
- a checkpoint (run dir or checkpoint dir): dense = load_model(); sparse = the same weights in PackedFFN layers
  (every neuron kept, trained order: pack it to prune dead neurons and balance tiles);
- nothing: synthetic weights. A random SparseLlama whose FFN gates are set, layer by layer on calibration
  tokens, so that each neuron fires on a chosen share of tokens (PERFORMANCE.md's rates: log-normal, 30% dead,
  mean (1 − sparsity)·H). The embeddings carry one constant feature, which plays the role of PERFORMANCE.md's
  fixed feature: the gate's threshold is a weight on it (CONST_FEATURE explains the embeddings' scale). The
  measured sparsity is what the report shows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sparsify_cli.bench.measure import nnz_stats
from sparsify_cli.bench.synthetic import firing_rates
from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model.transformer import SparseLlama

# Embeddings ~ N(0, 1) with feature 0 = CONST_FEATURE for every token: the embedding dominates the residual stream
# (attention and FFN outputs of a random model are ~0.1 of it), so an FFN's input looks alike at every position —
# the first token of a sequence and a decode step included — and feature 0 stays ≈ 4 after RMSNorm.
CONST_FEATURE = 4.0


@dataclass
class Models:
    dense: SparseLlama
    sparse: SparseLlama
    source: str  # "synthetic", "checkpoint" or "packed"
    description: str
    backend: str  # the packed FFNs' backend: cuda or torch
    policy_note: Optional[str] = None  # on cuda: where the FFNs' dense/sparse rule came from (packed.use_backend)


def _packed_ffn(model: SparseLlama, layer: int, nnz_hint: float):
    """Layer `layer`'s FFN of `model` as a PackedFFN: every neuron kept, in its order."""
    from sparsify_cli.pack.layout import choose_tile
    from sparsify_cli.pack.pack import _ffn_weights
    from sparsify_cli.pack.packed import PackedFFN

    ffn = model.ffns[layer]
    width = ffn.up.weight.shape[0]
    weights = _ffn_weights(model, layer, torch.arange(width, device=ffn.up.weight.device))
    layout = {"tile": choose_tile(width), "compression": 8, "stats": {"mean_active": nnz_hint}}
    return PackedFFN(layer, ffn.gated, weights, layout)


def to_packed(dense: SparseLlama, nnz_per_layer: list[float]) -> SparseLlama:
    """A copy of `dense` whose FFNs are PackedFFNs over the same weights (no pruning, no reordering)."""
    sparse = copy.deepcopy(dense)
    for i, block in enumerate(sparse.blocks):
        block.ffn = _packed_ffn(dense, i, nnz_per_layer[i])
    return sparse.eval()


def dense_twin(packed: SparseLlama) -> SparseLlama:
    """The dense model a packed one came from, as far as it is in the packed weights: the kept neurons back at
    their source index, pruned ones as zero rows (they never fired in calibration)."""
    cfg = packed.cfg
    dense = SparseLlama(cfg)
    state = {k: v for k, v in packed.state_dict().items() if ".ffn." not in k}
    dense.load_state_dict(state, strict=False)
    with torch.no_grad():
        for ffn, pk in zip(dense.ffns, packed.ffns):
            keep = pk.neuron_index >= 0  # padding neurons (index -1) have no source row
            idx = pk.neuron_index[keep]
            for lin in (ffn.gate, ffn.up, ffn.down):
                if lin is None:
                    continue
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            if ffn.gated:
                ffn.gate.weight[idx] = pk.gate_w[keep].float()
                if pk.gate_b is not None:
                    ffn.gate.bias[idx] = pk.gate_b[keep].float()
            ffn.up.weight[idx] = pk.up_w[keep].float()
            ffn.down.weight[:, idx] = pk.down_t[keep].float().T
            if pk.up_b is not None:
                ffn.up.bias[idx] = pk.up_b[keep].float()
            if pk.down_b is not None:
                ffn.down.bias.copy_(pk.down_b.float())
    return dense.eval()


def synthetic_model(cfg: ModelConfig, sparsity: float, seed: int, calib: torch.Tensor,
                    device: torch.device | str = "cpu") -> SparseLlama:
    """A random ReLU-gated SparseLlama (on `device`, fp32) whose FFN neurons fire at PERFORMANCE.md's rates on
    tokens like `calib` (B, T).

    One pass over the blocks: for block i, the FFN input of the calibration tokens is computed with the blocks
    before it already set; each neuron's gate weight on the constant feature is lowered by the (1 − r_j) quantile
    of its pre-activation, so that it fires on about r_j of the tokens (dead neurons: above every input)."""
    torch.manual_seed(seed)
    model = SparseLlama(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    h = cfg.d_ffn
    tokens = calib.to(device)
    t = tokens.shape[1]
    cos, sin = model.rope_cos[:t], model.rope_sin[:t]
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0, generator=torch.Generator(device).manual_seed(seed + 2))
        model.embed.weight[:, 0] = CONST_FEATURE
        x = model.embed(tokens)  # (B, T, D) the residual stream
        for block in model.blocks:  # in order: each layer's change moves the next layer's inputs
            ffn = block.ffn
            x = x + block.attn(block.attn_norm(x), cos, sin)
            xin = block.ffn_norm(x)  # (B, T, D) the FFN's input
            flat = xin.reshape(-1, xin.shape[-1]).double()  # (N, D)
            rates = firing_rates(h, (1.0 - sparsity) * h, generator=gen).to(device).double()  # (H,)
            z = flat @ ffn.gate.weight.double().T  # (N, H) pre-activations before the shift
            q = _column_quantiles(z, 1.0 - rates)  # (H,) the shift that leaves r_j of the tokens above 0
            q = torch.where(rates > 0, q, z.max(0).values.abs() * 4 + 1.0)  # dead neurons: far above any input
            ffn.gate.weight[:, 0] -= (q / flat[:, 0].mean()).to(ffn.gate.weight.dtype)
            del z, flat
            x = x + ffn(xin)
    return model


def _column_quantiles(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per column j of z (N, H): the q_j quantile (nearest rank)."""
    s, _ = z.sort(dim=0)
    idx = (q.clamp(0.0, 1.0) * (z.shape[0] - 1)).round().long()  # (H,)
    return s.gather(0, idx.unsqueeze(0)).squeeze(0)


def load_models(settings, source: Optional[str], device: torch.device, say=lambda s: None) -> Models:
    """The dense and the sparse model of the run, on `device` (bf16 on a GPU)."""
    from sparsify_cli.kernels import resolve_backend

    kernels = "cuda" if device.type == "cuda" else "torch"
    backend = resolve_backend(kernels)
    if source is None:
        cfg = ModelConfig(d_model=settings.d_model, n_layers=settings.layers, n_heads=settings.heads,
                          d_ffn=settings.d_ffn, vocab_size=settings.vocab, max_seq_len=settings.seq_len)
        say(f"synthetic model: {cfg.n_layers} layers, D {cfg.d_model}, H {cfg.d_ffn}, target sparsity "
            f"{settings.sparsity:.2%}; setting the gates layer by layer")
        calib = random_tokens(cfg.vocab_size, max(1, 4096 // settings.seq_len), settings.seq_len,
                              settings.seed + 7)
        dense = synthetic_model(cfg, settings.sparsity, settings.seed, calib, device)
        # The sparse twin is what `sparsify pack` makes of it: calibrated on the same kind of tokens, dead neurons
        # removed, hot-first order (the GPU's hybrid path), per-layer hints.
        from sparsify_cli.pack.pack import PackOptions, pack_layers

        sparse = pack_layers(dense, [(calib, calib)], PackOptions())[0]
        kind, desc = "synthetic", (f"synthetic weights, target sparsity {settings.sparsity:.2%} (PERFORMANCE.md's "
                                   "rates); sparse = those weights as `sparsify pack` lays them out (calibrated on "
                                   f"{calib.numel()} tokens: dead neurons removed, hot-first order)")
    else:
        from sparsify_cli.pack.packed import is_packed_dir, load_packed
        from sparsify_cli.train.checkpoint import load_model, resolve_checkpoint_dir

        path = Path(source)
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if is_packed_dir(path):
            host, _ = load_packed(path, "cpu", kernels="torch")
            dense = dense_twin(host)
            sparse, _ = load_packed(path, "cpu", kernels=kernels)
            kind, desc = "packed", f"packed dir {path}; dense = its weights at the source width (pruned rows zero)"
        else:
            try:
                resolve_checkpoint_dir(path)
            except UserError:
                raise UserError(f"{path} is neither a sparsify checkpoint (config.json + model.safetensors) nor a "
                                "packed dir (manifest.json)") from None
            dense, _ = load_model(path)
            dense.eval()
            if dense.cfg.activation != "relu":
                raise UserError(f"{path} has {dense.cfg.activation} FFNs: the sparse path needs ReLU (train with "
                                "model.activation=relu)")
            sparse = to_packed(dense, [float(dense.cfg.d_ffn)] * dense.cfg.n_layers)  # hints set after measuring
            kind, desc = "checkpoint", f"checkpoint {path}; sparse = its weights in PackedFFN layers (not pruned)"
    from sparsify_cli.pack.packed import use_backend

    policy_note = use_backend(sparse.ffns, backend, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = dense.to(device=device, dtype=dtype).eval()
    sparse = sparse.to(device=device, dtype=dtype).eval()
    return Models(dense, sparse, kind, desc, backend, policy_note)


def random_tokens(vocab: int, batch: int, seq_len: int, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, seq_len) token ids drawn uniformly from the vocabulary, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)


def measure_nnz(model: SparseLlama, tokens: torch.Tensor) -> tuple[dict[str, Any], list[float]]:
    """Active FFN neurons per token over all layers (one observed forward) and the mean per layer."""
    per_layer: list[dict[str, float]] = []  # statistics only: the activations of a big prefill would not fit twice
    model.set_observer(lambda layer, h: per_layer.append(nnz_stats(h.detach() != 0, model.cfg.d_ffn)))
    try:
        with torch.inference_mode():
            model(tokens)
    finally:
        model.set_observer(None)
    stats = {
        "nnz_mean": sum(s["nnz_mean"] for s in per_layer) / len(per_layer),
        "nnz_max": max(s["nnz_max"] for s in per_layer),
        "max_per_tile": max(s["max_per_tile"] for s in per_layer),
    }
    stats["sparsity"] = 1.0 - stats["nnz_mean"] / model.cfg.d_ffn
    return stats, [s["nnz_mean"] for s in per_layer]
