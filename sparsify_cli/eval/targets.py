"""What `sparsify eval` can evaluate: a checkpoint (run dir or checkpoint dir) or a packed directory.

A packed directory is evaluated together with its source checkpoint (named in its manifest), so that the report
can say how far the packed model's outputs are from the model it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sparsify_cli.errors import UserError
from sparsify_cli.train.checkpoint import CHECKPOINT_SUBDIR, load_model, resolve_checkpoint_dir


@dataclass
class EvalTarget:
    path: Path  # as given on the command line
    kind: str  # "checkpoint" | "packed"
    model: nn.Module
    model_config: dict[str, Any]  # ModelConfig as a dict
    run: dict[str, Any]  # the run config of the checkpoint (of the source checkpoint, for a packed dir)
    tokenizer_path: Path
    label: str = ""
    source_widths: list[int] | None = None  # packed: H per layer before dead neurons were pruned
    reference: nn.Module | None = None  # packed: the source checkpoint's model
    source_path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        sparsity = self.run.get("sparsity", {})
        return {
            "label": self.label,
            "path": str(self.path),
            "kind": self.kind,
            "source_checkpoint": str(self.source_path) if self.source_path else None,
            "parameters": sum(p.numel() for p in self.model.parameters()) + sum(
                b.numel() for n, b in self.model.named_buffers() if ".ffn." in n and b is not None
            ),
            "n_layers": self.model_config["n_layers"],
            "d_model": self.model_config["d_model"],
            "d_ffn": self.model_config["d_ffn"],
            "ffn": self.model_config["ffn"],
            "activation": self.model_config["activation"],
            "l1_coeff": sparsity.get("l1_coeff"),
            "train_steps": self.run.get("train", {}).get("max_steps"),
        }


def _pack_api():
    """sparsify_cli.pack's loader, or None when this installation has no `sparsify pack`."""
    try:
        from sparsify_cli.pack import is_packed_dir, load_packed
    except ImportError:
        return None
    return is_packed_dir, load_packed


def load_target(path: str | Path, device) -> EvalTarget:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    api = _pack_api()
    if api is not None and api[0](path):
        return _load_packed(path, device, api[1])
    try:
        ckpt = resolve_checkpoint_dir(path)
    except UserError:
        if api is None and (path / "manifest.json").is_file():
            raise UserError(
                f"{path} looks like a packed directory, and packed directories need sparsify pack, "
                "which this installation does not have"
            ) from None
        raise
    model, config = load_model(ckpt, device)
    tokenizer = ckpt / "tokenizer.json"
    if not tokenizer.is_file():
        raise UserError(f"{ckpt} has no tokenizer.json: it cannot be evaluated on text")
    return EvalTarget(path, "checkpoint", model.eval(), config["model"], config.get("run") or {}, tokenizer)


def _load_packed(path: Path, device, load_packed) -> EvalTarget:
    from sparsify_cli.data.tokenizer import load_tokenizer, tokenizer_hash

    model, manifest = load_packed(path, device=device, kernels="torch")
    source = Path(manifest.get("source", {}).get("checkpoint", ""))
    if not (source / "config.json").is_file():
        raise UserError(
            f"{path} was packed from {source}, which is gone: its agreement with the source cannot be measured "
            "(restore the checkpoint there)"
        )
    reference, config = load_model(source, device)
    want = manifest["source"].get("model_sha256")
    if want:
        from sparsify_cli.pack.packed import file_digest

        if file_digest(resolve_checkpoint_dir(source) / "model.safetensors") != want:
            raise UserError(f"{source} changed after {path} was packed from it: pack it again")
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = resolve_checkpoint_dir(source) / "tokenizer.json"
    source_tok = resolve_checkpoint_dir(source) / "tokenizer.json"
    if tokenizer_hash(load_tokenizer(str(tokenizer))) != tokenizer_hash(load_tokenizer(str(source_tok))):
        raise UserError(f"{path} and its source {source} have different tokenizers")
    widths = [int(layer.get("d_ffn_source", layer.get("d_ffn"))) for layer in manifest["layers"]]
    return EvalTarget(
        path, "packed", model.eval(), manifest["model"], config.get("run") or {}, tokenizer,
        source_widths=widths, reference=reference.eval(), source_path=source, manifest=manifest,
    )


def assign_labels(targets: list[EvalTarget]) -> None:
    """Short, unique names: the directory's name (its parent's for a …/checkpoint dir), longer paths on clashes."""
    def short(t: EvalTarget, depth: int) -> str:
        parts = [p for p in t.path.resolve().parts if p != "/"]
        if parts and parts[-1] == CHECKPOINT_SUBDIR:
            parts = parts[:-1]
        return "/".join(parts[-depth:])

    for depth in range(1, 64):
        labels = [short(t, depth) for t in targets]
        if len(set(labels)) == len(labels):
            break
    for t, label in zip(targets, labels):
        t.label = label
