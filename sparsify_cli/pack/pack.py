"""`sparsify pack`: calibrate a trained checkpoint, prune dead neurons, lay the FFNs out for the kernels."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from sparsify_cli.errors import UserError
from sparsify_cli.formats import FORMAT_VERSION as TWELL_VERSION
from sparsify_cli.model.transformer import SparseLlama
from sparsify_cli.pack import layout
from sparsify_cli.pack.calibrate import record_neurons, record_tiles
from sparsify_cli.pack.packed import (
    MANIFEST, PACKED_FORMAT, PACKED_VERSION, WEIGHTS, PackedFFN, file_digest, manifest_digest,
)
from sparsify_cli.storage import atomic_directory, write_text

CALIB_BATCH = 8  # sequences per calibration forward


@dataclass
class PackOptions:
    calib_tokens: int = 32768  # tokens of held-out text to calibrate on
    reorder: str = "hot"  # hot | balance | none (layout.py explains)
    margin: float = 1.25  # format parameters cover the calibration maxima times this
    preferred_tile: int = 256
    seq_len: Optional[int] = None  # calibration window; default: the checkpoint's train.seq_len

    def __post_init__(self) -> None:
        if self.calib_tokens <= 0:
            raise UserError(f"--calib-tokens must be > 0, got {self.calib_tokens}")
        if self.reorder not in layout.REORDERS:
            raise UserError(f"--reorder {self.reorder!r} is not valid; choose one of: {', '.join(layout.REORDERS)}")
        if self.margin < 1.0:
            raise UserError(f"--margin must be >= 1, got {self.margin}")


def _windows(tokens, seq_len: int, start: int, n_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous (x, y) windows of seq_len from tokens[start:], about n_tokens in all, CALIB_BATCH per batch."""
    n_seq = min(math.ceil(n_tokens / seq_len), (len(tokens) - start - 1) // seq_len)
    if n_seq <= 0:
        return []
    flat = torch.from_numpy(tokens[start:start + n_seq * seq_len + 1].astype("int64"))
    x = flat[:-1].view(n_seq, seq_len)
    y = flat[1:].view(n_seq, seq_len)
    return [(x[i:i + CALIB_BATCH], y[i:i + CALIB_BATCH]) for i in range(0, n_seq, CALIB_BATCH)]


def _ffn_weights(model: SparseLlama, layer: int, order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's FFN weights restricted to `order` (kept neurons, new order), laid out (H', D) each."""
    ffn = model.ffns[layer]
    w = {
        "up_w": ffn.up.weight[order],
        "down_t": ffn.down.weight.t()[order],  # Downᵀ rows: one active neuron = one contiguous row
        "neuron_index": order.clone(),
    }
    if ffn.gated:
        w["gate_w"] = ffn.gate.weight[order]
    if ffn.up.bias is not None:
        w["up_b"] = ffn.up.bias[order]
        w["down_b"] = ffn.down.bias.clone()
        if ffn.gated:
            w["gate_b"] = ffn.gate.bias[order]
    return {k: v.detach().contiguous() for k, v in w.items()}


@torch.no_grad()
def _agreement(source: SparseLlama, packed: SparseLlama, batches) -> dict[str, float]:
    max_diff, abs_sum, n, ce_src, ce_pk, count = 0.0, 0.0, 0, 0.0, 0.0, 0
    for x, y in batches:
        a, b = source(x).float(), packed(x).float()  # (B, T, V)
        diff = (a - b).abs()
        max_diff = max(max_diff, float(diff.max()))
        abs_sum += float(diff.sum())
        n += diff.numel()
        ce_src += float(F.cross_entropy(a.flatten(0, 1), y.flatten(), reduction="sum"))
        ce_pk += float(F.cross_entropy(b.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return {
        "tokens": count,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": abs_sum / max(n, 1),
        "ce_source": ce_src / count,
        "ce_packed": ce_pk / count,
        "ce_diff": (ce_pk - ce_src) / count,
    }


@torch.no_grad()
def pack_layers(model: SparseLlama, calib, options: PackOptions) -> tuple[SparseLlama, list[dict], dict[str, torch.Tensor]]:
    """The packed twin of `model` from calibration batches [(x, y), ...]: (packed model, per-layer layouts for the
    manifest, the FFN tensors to save). The packed model shares nothing with `model` but its non-FFN weights."""
    neurons = record_neurons(model, calib)  # pass 1: who fires
    packed = SparseLlama(dataclasses.replace(model.cfg, d_ffn=1))
    packed.load_state_dict({k: v for k, v in model.state_dict().items() if ".ffn." not in k}, strict=False)
    packed.cfg = model.cfg
    packed.to(next(model.parameters()).device)
    layers, tensors = [], {}
    for i, rec in enumerate(neurons):
        alive = int((rec.fires > 0).sum())
        order, n_hot, tile = layout.layer_order(rec.fires, rec.tokens, options.reorder, options.preferred_tile)
        weights = layout.pad_width(_ffn_weights(model, i, order.to(model.ffns[i].up.weight.device)))
        counts = rec.token_counts().double()
        stats = {
            "mean_active": float(counts.mean()),
            "p99_active": float(torch.quantile(counts, 0.99)) if counts.numel() else 0.0,
            "max_active": int(counts.max()) if counts.numel() else 0,
            "dead": int(rec.fires.numel() - alive),
            # what the sparse kernel sees on the hybrid path: active neurons per token beyond the hot ones
            "cold_mean_active": float(rec.fires[order[n_hot:]].sum()) / max(rec.tokens, 1),
        }
        layers.append({"d_ffn_source": int(rec.fires.numel()), "d_ffn": alive, "width": int(weights["up_w"].shape[0]),
                       "n_hot": n_hot, "tile": tile, "compression": 8, "stats": stats})
        packed.blocks[i].ffn = PackedFFN(i, model.cfg.ffn == "gated", weights, layers[-1])
        tensors.update({f"blocks.{i}.ffn.{k}": v for k, v in weights.items()})

    tiles = record_tiles(packed, calib, [l["tile"] for l in layers])  # pass 2: per-tile counts, final layout
    for layer, rec, ffn in zip(layers, tiles, packed.ffns):
        c = layout.choose_compression(rec.tile, rec.hist, options.margin)
        capacity = rec.tile // c - 1
        layer.update(compression=c, capacity=capacity, ell_width=layout.ell_width(rec.max_per_token, options.margin))
        layer["stats"].update(
            max_per_tile=rec.max_per_tile,
            q999_per_tile=layout.hist_quantile(rec.hist, layout.COVER_QUANTILE),
            overflow_fraction=layout.overflow_fraction(rec.hist, capacity),
        )
        ffn.compression = c
    return packed.eval(), layers, tensors


def pack_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    options: PackOptions,
    data_overrides: list[str] | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Write the packed directory `out` for `checkpoint`; return its manifest."""
    from sparsify_cli.config.compose import data_config
    from sparsify_cli.data import prepare_data
    from sparsify_cli.train.checkpoint import load_model, resolve_checkpoint_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out or remove it")
    ckpt = resolve_checkpoint_dir(checkpoint)
    model, config = load_model(ckpt)
    if model.cfg.activation != "relu":
        raise UserError(
            f"{ckpt} is a dense model (activation={model.cfg.activation}): packing needs ReLU activations "
            "(train with model.activation=relu and sparsity.l1_coeff > 0)"
        )
    dcfg = data_config(config["run"]["data"], data_overrides or [])
    data = prepare_data(dcfg, tokenizer_path=str(ckpt / "tokenizer.json"), progress=say)
    seq_len = options.seq_len or int(config["run"]["train"]["seq_len"])
    calib = _windows(data.heldout_tokens, seq_len, 0, options.calib_tokens)
    if not calib:
        raise UserError(f"no calibration text: the held-out split ({len(data.heldout_tokens)} tokens) is shorter than one "
                        f"window of {seq_len + 1} tokens; give more text with data.path=… or a shorter --seq-len")
    used = sum(x.numel() for x, _ in calib)
    agree = _windows(data.heldout_tokens, seq_len, used, options.calib_tokens) or calib
    agreement_on = "held-out text after the calibration tokens" if agree is not calib else "the calibration tokens"
    say(f"calibrating on {used:,} held-out tokens ({data.description})")

    packed, layers, tensors = pack_layers(model, calib, options)
    # On the calibration tokens the pruned neurons never fire, so only summation order differs (fp32 rounding);
    # on other text a pruned neuron may fire now and then: that difference is the price of pruning.
    agreement = {
        "calibration": _agreement(model, packed, calib),
        "heldout": {**_agreement(model, packed, agree), "on": agreement_on},
    }
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".ffn." not in k}
    if model.cfg.tie_embeddings:
        rest.pop("lm_head.weight", None)
    manifest = {
        "format": PACKED_FORMAT,
        "format_version": PACKED_VERSION,
        "twell_version": TWELL_VERSION,
        "model": dataclasses.asdict(model.cfg),
        "layers": layers,
        "options": dataclasses.asdict(options) | {"seq_len": seq_len},
        "source": {"checkpoint": str(ckpt.resolve()), "model_sha256": file_digest(ckpt / "model.safetensors")},
        "calibration": {"split": "held-out", "tokens": used, "data": data.description,
                        "data_fingerprint": data.fingerprint},
        "agreement": agreement,
    }
    _write_packed(out, {**rest, **tensors}, manifest, (ckpt / "tokenizer.json").read_text())
    return json.loads((out / MANIFEST).read_text())


def _write_packed(out: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], tokenizer: str) -> None:
    """PACKED is complete or absent (storage.atomic_directory)."""
    from safetensors.torch import save_file

    if out.exists():
        out.rmdir()  # empty (checked before any work)
    with atomic_directory(out) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": PACKED_FORMAT})
        manifest["weights_sha256"] = file_digest(tmp / WEIGHTS)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        write_text(tmp / "tokenizer.json", tokenizer)
