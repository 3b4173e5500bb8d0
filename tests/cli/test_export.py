"""`sparsify export --hf` and `sparsify train --init`, end to end through the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.cli.app import app
from sparsify_cli.config.compose import compose
from sparsify_cli.model import SparseLlama
from sparsify_cli.train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
runner = CliRunner()


def trained_like(tmp_path, **model_kw):
    """A sparsify checkpoint of a small random ReLU model (weights drawn wide enough to give real logits)."""
    cfg = compose("tiny", [f"model.{k}={v}" for k, v in {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                         "d_ffn": 64, "vocab_size": 300, **model_kw}.items()]).model
    torch.manual_seed(0)
    model = SparseLlama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    tokenizer_json = json.dumps({"version": "1.0", "marker": "the run's own tokenizer"})
    ckpt.save_checkpoint(tmp_path / "run", model, {}, tokenizer_json)
    return model, tokenizer_json


@pytest.mark.parametrize("model_kw, arch", [({}, "LlamaForCausalLM"), ({"attn_bias": "true", "tie_embeddings": "false"}, "Qwen2ForCausalLM")])
def test_export_loads_in_transformers_with_our_logits(tmp_path, model_kw, arch):
    model, tokenizer_json = trained_like(tmp_path, **model_kw)
    out = tmp_path / "hf"
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--hf", str(out)])
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == arch and theirs.config.hidden_act == "relu"
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(x)
        assert ours.std() > 0.3
        assert float((theirs(x).logits - ours).abs().max()) < 1e-4
    assert (out / "tokenizer.json").read_text() == tokenizer_json


def test_export_bfloat16_and_bad_targets(tmp_path):
    model, _ = trained_like(tmp_path)
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--hf", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(theirs.model.embed_tokens.weight, model.embed.weight.to(torch.bfloat16))
    for args, needle in [
        (["export", str(tmp_path / "run"), "--hf", str(tmp_path / "bf16")], "not an empty directory"),
        (["export", str(tmp_path / "run"), "--hf", str(tmp_path / "x"), "--dtype", "int8"], "choose one of: float32"),
        (["export", str(tmp_path / "nothing"), "--hf", str(tmp_path / "y")], "does not exist"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_train_init_option_runs_relufy_from_a_sparsify_run_then_resumes(small_overrides, tmp_path):
    # A dense SiLU run to start from, then `--recipe relufy --init` on it: same shape and tokenizer, ReLU gate.
    dense = [o for o in small_overrides if not o.startswith("train.max_steps")] + ["model.activation=silu"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "dense"), *dense, "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    keep = [o for o in small_overrides if not o.startswith(("model.", "train.max_steps"))]
    args = ["train", "--recipe", "relufy", "--init", str(tmp_path / "dense"), "--out", str(tmp_path / "relu"), *keep,
            "train.grad_accum=1"]
    shown = runner.invoke(app, [*args, "--show-config"])
    assert shown.exit_code == 0 and f"init: {tmp_path / 'dense'}" in shown.output
    r = runner.invoke(app, [*args, "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    assert "initialized from" in r.output
    config = ckpt.read_config(tmp_path / "relu" / "checkpoint")
    assert config["model"]["activation"] == "relu" and config["model"]["d_model"] == 32
    tokenizers = [(tmp_path / d / "checkpoint" / "tokenizer.json").read_text() for d in ("dense", "relu")]
    assert tokenizers[0] == tokenizers[1]
    again = runner.invoke(app, [*args, "train.max_steps=3", "--resume"])
    assert again.exit_code == 0, again.output
    assert "resumed" in again.output and json.loads((tmp_path / "relu" / "summary.json").read_text())["step"] == 3
    # Its export names the tokenizer's document separator as eos_token_id.
    assert runner.invoke(app, ["export", str(tmp_path / "relu"), "--hf", str(tmp_path / "hf")]).exit_code == 0
    from tokenizers import Tokenizer

    eos = Tokenizer.from_str(tokenizers[1]).token_to_id("<|endoftext|>")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos
    # ... and transformers' AutoTokenizer reads the tokenizer as it is, separator included.
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token_id == eos
    text = "the king speaks of love"
    assert theirs(text)["input_ids"] == Tokenizer.from_str(tokenizers[1]).encode(text).ids
