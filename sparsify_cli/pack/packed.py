"""A packed model: the directory `sparsify pack` writes, and the modules that run it.

    PACKED/
        manifest.json       format + version, model config, per-layer layout/format/statistics, source
                            checkpoint and its hash, calibration set, agreement, weights hash, manifest hash
        model.safetensors   non-FFN weights under their checkpoint names; per FFN layer i:
                            blocks.i.ffn.{gate_w, up_w, down_t} (H_i, D) — Downᵀ stored row-major, so that one
                            active neuron is one contiguous row of each — optional {gate_b, up_b, down_b}, and
                            neuron_index (H_i,) int64: the neuron's index in the source checkpoint, -1 for
                            the all-zero neurons that pad H_i to a multiple of 64 (they never fire)
        tokenizer.json

Loading swaps each FFN for a PackedFFN (offline conversion, run-time module swap). On a GPU with the CUDA
kernels it runs them; elsewhere it runs the pure-torch gather path of formats/, which computes the same function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.kernels.ffn import DEFAULT_POLICY
from sparsify_cli.model.ffn import ActivationObserver
from sparsify_cli.model.transformer import SparseLlama
from sparsify_cli.storage import read_versioned_json

PACKED_FORMAT = "sparsify-packed"
PACKED_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


class PackedFFN(nn.Module):
    """A pruned, reordered FFN layer whose forward touches only active neurons."""

    def __init__(self, layer_index: int, gated: bool, weights: dict[str, torch.Tensor], layout: dict[str, Any]):
        super().__init__()
        self.layer_index, self.gated = layer_index, gated
        for name in ("gate_w", "up_w", "down_t", "gate_b", "up_b", "down_b", "neuron_index"):
            t = weights.get(name)
            self.register_buffer(name, t if t is not None else None)
        self.tile, self.compression = int(layout["tile"]), int(layout["compression"])
        # The layer's FFN width before pruning: with D, the shape a dense/sparse rule is measured at (use_backend)
        self.d_ffn_source = int(layout.get("d_ffn_source", self.up_w.shape[0]))
        # Hot-first layers (pack --reorder hot): the first n_hot neurons run densely on the GPU, the rest sparsely;
        # the prefill density rule then looks at the cold neurons only (cold_nnz_hint); the fused decode path runs
        # every neuron sparsely, so its rule looks at all of them (nnz_hint).
        self.n_hot = int(layout.get("n_hot", 0))
        stats = layout["stats"]
        self.nnz_hint = float(stats["mean_active"])
        self.cold_nnz_hint = float(stats["cold_mean_active"]) if self.n_hot else None
        self.backend = "torch"
        # ffn_forward's mode on the CUDA backend: auto (the policy: eager decode-sized calls go dense), sparse or
        # dense. bench/model.py's DecodeGraph sets sparse for a warm-up step, so that the decode kernels a CUDA
        # graph records are compiled and loaded before the capture.
        self.mode = "auto"
        # The dense/sparse rule on the CUDA backend: use_backend sets this GPU's (kernels/device_policy.py).
        self.policy = DEFAULT_POLICY
        self.observer: Optional[ActivationObserver] = None

    @property
    def width(self) -> int:
        return self.up_w.shape[0]

    @property
    def source_shape(self) -> tuple[int, int]:
        """(D, H) of the dense layer this one was packed from: what `sparsify bench --suite policy` takes as
        d_model and d_ffn to measure this layer's crossover."""
        return int(self.up_w.shape[1]), self.d_ffn_source

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense h (…, H_i): only for observers (statistics); the forward itself never builds it. Computed in the
        weights' dtype, as the forward computes (on the CUDA backend the FFN weights are bf16 in an fp32 model)."""
        x = x.to(self.up_w.dtype)
        if self.gated:
            return torch.relu(nn.functional.linear(x, self.gate_w, self.gate_b)) * nn.functional.linear(x, self.up_w, self.up_b)
        return torch.relu(nn.functional.linear(x, self.up_w, self.up_b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, D)
        flat = x.reshape(-1, shape[-1])  # (M, D)
        if self.observer is not None:
            self.observer(self.layer_index, self.activations(x))
        if self.width == 0:  # every neuron was dead: the block adds only its bias
            out = torch.zeros_like(flat) if self.down_b is None else self.down_b.expand_as(flat).clone()
        elif self.backend == "cuda" and flat.is_cuda and self.gate_b is None and self.up_b is None:
            out = self._cuda_forward(flat)
        else:
            out = self._torch_forward(flat)
        return out.reshape(shape)

    def _torch_forward(self, flat: torch.Tensor) -> torch.Tensor:
        from sparsify_cli.formats import sparse_ffn_forward, sparse_plain_ffn_forward

        dt = self.up_w.dtype
        if self.gated:
            out = sparse_ffn_forward(flat.to(dt), self.gate_w, self.up_w, self.down_t, self.gate_b, self.up_b, self.down_b)
        else:
            out = sparse_plain_ffn_forward(flat.to(dt), self.up_w, self.down_t, self.up_b, self.down_b)
        return out.to(flat.dtype)

    def _cuda_forward(self, flat: torch.Tensor) -> torch.Tensor:
        from sparsify_cli.kernels import ffn_forward

        w_act = self.gate_w if self.gated else self.up_w
        up = self.up_w if self.gated else None
        out = ffn_forward(
            flat.to(self.up_w.dtype), w_act, up, self.down_t, kernels="cuda", mode=self.mode, nnz_hint=self.nnz_hint,
            cold_nnz_hint=self.cold_nnz_hint, tile=self.tile, slots=self.tile // self.compression, n_hot=self.n_hot,
            policy=self.policy,
        )
        if self.down_b is not None:
            out = out + self.down_b
        return out.to(flat.dtype)


def use_backend(ffns, backend: str, device: torch.device | str) -> Optional[str]:
    """Set each PackedFFN's backend ("cuda" or "torch") and, on the CUDA backend, the dense/sparse rule of the GPU
    it runs on (kernels/device_policy.py: measured by `sparsify bench --suite policy`, else the H100 defaults).
    Returns the rule's one-line note (None on the torch backend, which has no rule)."""
    policy, note = DEFAULT_POLICY, None
    if backend == "cuda":
        from sparsify_cli.kernels.device_policy import for_device

        policy, note = for_device(torch.device(device), shapes={ffn.source_shape for ffn in ffns})
    for ffn in ffns:
        ffn.backend, ffn.policy = backend, policy
    return note


def is_packed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not is_packed_dir(path):
        raise UserError(f"{path} is not a packed directory (no {MANIFEST}); make one with `sparsify pack`")
    manifest = read_versioned_json(path / MANIFEST, PACKED_FORMAT, PACKED_VERSION, "pack the checkpoint again")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise UserError(f"{path / MANIFEST} was modified after packing (its digest does not match): pack again")
    return manifest


def load_packed(
    path: str | Path, device: str | torch.device = "cpu", kernels: str = "auto", verify_weights: bool = True
) -> tuple[SparseLlama, dict[str, Any]]:
    """Load PACKED as a SparseLlama whose FFNs are PackedFFNs; return (model, manifest).

    kernels: auto | cuda | torch. `auto` takes the CUDA kernels on a GPU where they can run, else torch;
    the backend chosen is in model.ffn_backend (and the reason in model.ffn_backend_reason); on the CUDA backend,
    model.ffn_policy_note says where the dense/sparse rule came from (use_backend).
    """
    from sparsify_cli.kernels import cuda_kernels_status, resolve_backend
    from sparsify_cli.train.checkpoint import load_safetensors

    path = Path(path)
    manifest = read_manifest(path)
    if verify_weights and manifest.get("weights_sha256") != file_digest(path / WEIGHTS):
        raise UserError(f"{path / WEIGHTS} does not match the manifest's hash (changed or corrupt): pack again")
    cfg = ModelConfig(**manifest["model"])
    state = load_safetensors(path / WEIGHTS)
    # Build the non-FFN part at its real size; the FFNs are replaced below, so build them minimal.
    model = SparseLlama(dataclasses.replace(cfg, d_ffn=1))
    model.cfg = cfg
    ffn_state: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "ffn":
            ffn_state.setdefault(int(parts[1]), {})[parts[3]] = tensor
        else:
            rest[key] = tensor
    if cfg.tie_embeddings:
        rest["lm_head.weight"] = rest.get("embed.weight")
    for i, block in enumerate(model.blocks):
        if i not in ffn_state:
            raise UserError(f"{path / WEIGHTS} lacks the FFN weights of layer {i}")
        block.ffn = PackedFFN(i, cfg.ffn == "gated", ffn_state[i], manifest["layers"][i])
    missing = [k for k in model.state_dict() if k not in rest and ".ffn." not in k]
    if missing:
        raise UserError(f"{path / WEIGHTS} lacks {missing[0]} (and {len(missing) - 1} more)")
    model.load_state_dict(rest, strict=False)
    backend = resolve_backend(kernels)
    device = torch.device(device)
    if backend == "cuda" and device.type != "cuda":
        backend = "torch"
    model.ffn_policy_note = use_backend(model.ffns, backend, device)
    model.ffn_backend = backend
    model.ffn_backend_reason = cuda_kernels_status()[1]
    model = model.to(device)
    if backend == "cuda":
        for ffn in model.ffns:  # the kernels read bf16 weights
            for name in ("gate_w", "up_w", "down_t"):
                t = getattr(ffn, name)
                if t is not None:
                    setattr(ffn, name, t.to(torch.bfloat16))
    return model.eval(), manifest
