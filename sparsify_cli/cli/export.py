"""`sparsify export`: a trained checkpoint as a Hugging Face directory that `transformers` loads."""

from __future__ import annotations

from pathlib import Path

import typer

from sparsify_cli.cli.common import console, user_errors_exit

HELP = """Write a trained checkpoint as a Hugging Face model directory.

The directory holds config.json (LlamaForCausalLM, or Qwen2ForCausalLM for a model with q/k/v biases, with
hidden_act relu for a ReLU-gated model), model.safetensors and the run's tokenizer.json; transformers loads it
with AutoModelForCausalLM.from_pretrained(OUT) and computes the same logits.

  sparsify export runs/smol-sparse --hf /models/smol-sparse-hf

  sparsify export runs/smol-sparse --hf /models/smol-sparse-hf --dtype bfloat16
"""


def export(
    checkpoint: Path = typer.Argument(..., help="A run directory or checkpoint directory from `sparsify train`."),
    hf: Path = typer.Option(..., "--hf", help="The Hugging Face directory to create (must not exist or be empty)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight dtype: float32, bfloat16 or float16."),
) -> None:
    _export(checkpoint, hf, dtype)


@user_errors_exit
def _export(checkpoint: Path, out: Path, dtype: str) -> None:
    from sparsify_cli.model.hf import export_hf
    from sparsify_cli.train import checkpoint as ckpt

    model, _ = ckpt.load_model(checkpoint)
    tokenizer_file = ckpt.resolve_checkpoint_dir(checkpoint) / "tokenizer.json"
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    path = export_hf(model, out, tokenizer_json, dtype, eos=_eos(tokenizer_json))
    cfg = model.cfg
    console.print(
        f"exported {checkpoint} → {path}: {cfg.n_layers} layers, D {cfg.d_model}, FFN {cfg.activation} H={cfg.d_ffn}, "
        f"{dtype}{'' if tokenizer_json else ' (no tokenizer.json in the checkpoint)'}",
        highlight=False,
    )


def _eos(tokenizer_json: str | None) -> tuple[int, str] | None:
    """(id, token) of the tokenizer's document separator, if it has one."""
    from tokenizers import Tokenizer

    from sparsify_cli.data.tokenizer import eos_id

    try:
        tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
        eos = eos_id(tokenizer, "tokenizer.json") if tokenizer else None
    except Exception:  # no separator, or a tokenizer.json `tokenizers` cannot read: the export just omits it
        return None
    return None if eos is None else (eos, tokenizer.id_to_token(eos))
