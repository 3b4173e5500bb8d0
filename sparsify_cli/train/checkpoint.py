"""Checkpoints: a directory that loads without pickle and is never seen half-written.

    <run dir>/checkpoint/
        config.json           format version, the model config, the run config, data fingerprint
        model.safetensors     weights (a tied LM head is stored once, as embed.weight)
        tokenizer.json        the tokenizer the model was trained with
        trainer.json          step, sampler position, wandb run id, … (JSON)
        trainer.safetensors   optimizer moments, RNG states, dead-neuron clock (tensors)

The whole directory is written under a temporary name beside the target and renamed into place, so a crash,
a full disk or Ctrl-C during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model.transformer import SparseLlama
from sparsify_cli.storage import atomic_directory, read_versioned_json, write_text

FORMAT = "sparsify-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoint"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory (holding checkpoint/) or a checkpoint directory itself."""
    path = Path(path)
    for candidate in (path / CHECKPOINT_SUBDIR, path):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    if not path.exists():
        raise UserError(f"{path} does not exist")
    raise UserError(f"{path} is not a sparsify checkpoint (no config.json + model.safetensors in it or in {path}/checkpoint)")


def model_state_for_saving(model_cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight; safetensors refuses shared storage
    return state


def save_checkpoint(
    run_dir: str | Path,
    model: SparseLlama | ModelConfig,
    run_config: dict[str, Any],
    tokenizer_json: str,
    trainer_state: dict[str, Any] | None = None,
    trainer_tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write <run_dir>/checkpoint atomically; return its path.

    `model` is the model, or its config when `weights` (a full state dict, e.g. gathered from FSDP) is given.
    """
    model_cfg = model if isinstance(model, ModelConfig) else model.cfg
    if weights is None:
        weights = model.state_dict()
    final = Path(run_dir) / CHECKPOINT_SUBDIR
    with atomic_directory(final) as tmp:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": dataclasses.asdict(model_cfg),
            "run": run_config,
            **(extra_config or {}),
        }
        write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
        save_file(model_state_for_saving(model_cfg, weights), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        write_text(tmp / "tokenizer.json", tokenizer_json)
        if trainer_state is not None:
            write_text(tmp / "trainer.json", json.dumps(trainer_state, indent=2, sort_keys=True))
        if trainer_tensors is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in trainer_tensors.items()}
            save_file(tensors, str(tmp / "trainer.safetensors"))
    return final


def read_config(ckpt_dir: Path) -> dict[str, Any]:
    return read_versioned_json(ckpt_dir / "config.json", FORMAT, FORMAT_VERSION)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[SparseLlama, dict[str, Any]]:
    """Load a checkpoint's model (strict: every weight present, every shape right); return (model, config)."""
    ckpt = resolve_checkpoint_dir(path)
    config = read_config(ckpt)
    try:
        model_cfg = ModelConfig(**config["model"])
    except (TypeError, UserError) as exc:
        raise UserError(f"{ckpt}/config.json has an invalid model config: {exc}") from exc
    model = SparseLlama(model_cfg)
    state = load_safetensors(ckpt / "model.safetensors")
    if model_cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{ckpt}/model.safetensors does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{ckpt}/model.safetensors: {key} has shape {tuple(state[key].shape)}, config says {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)
    return model.to(device), config


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is corrupt or unreadable: {exc}") from exc


def load_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state_path, tensor_path = ckpt / "trainer.json", ckpt / "trainer.safetensors"
    if not state_path.is_file() or not tensor_path.is_file():
        raise UserError(f"{ckpt} holds weights only (no trainer state): it cannot be resumed")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{state_path} is unreadable: {exc}") from exc
    return state, load_safetensors(tensor_path)
