"""Hugging Face import/export checked against `transformers` itself (a test-only dependency, the dev extra):
tiny random Llama, Mistral and Qwen2 models are saved with save_pretrained, imported into SparseLlama and
compared logit by logit in fp32; ReLU models are exported and loaded back through transformers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparsify_cli.config.compose import compose
from sparsify_cli.config.schema import RopeScalingConfig
from sparsify_cli.data.tokenizer import train_bpe
from sparsify_cli.errors import UserError
from sparsify_cli.model import SparseLlama
from sparsify_cli.model.hf import export_hf, load_hf, load_hf_model
from sparsify_cli.model.transformer import rotary_tables
from sparsify_cli.train.loop import Trainer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 300
TOL = 1e-4  # max |Δlogit| in fp32

# name -> (model_type, config keywords, how to save)
VARIANTS = {
    "llama3-gqa-untied-mlp-bias": (
        "llama",
        dict(num_key_value_heads=2, tie_word_embeddings=False, mlp_bias=True, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=16)),
        {},
    ),
    "llama2-tied-linear-rope-legacy-config": (
        "llama", dict(tie_word_embeddings=True, rope_scaling=dict(rope_type="linear", factor=2.0)), {"legacy": True}
    ),
    "smollm-like-9-heads-3-kv-tied": (
        "llama", dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=1e5), {}
    ),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=1, sliding_window=None, rope_theta=1e6), {}),
    "qwen2-gqa-tied-biases": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), {}),
    "qwen2-untied-sharded": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False), {"shard": "20KB"}),
}


@pytest.fixture(scope="session")
def tokenizer_json(small_corpus) -> str:
    docs = [p.read_text() for p in sorted(small_corpus.glob("*.txt"))]
    return train_bpe(docs, VOCAB).to_str()


def hf_model(model_type: str, seed: int = 0, **kw):
    """A tiny random transformers model; every parameter (biases and norms too) drawn so nothing is trivial."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return model


def save_hf(model, path: Path, tokenizer_json: str | None = None, shard: str | None = None, legacy: bool = False) -> Path:
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if legacy:  # the transformers-4 spelling of config.json: rope_theta and rope_scaling at the top level
        config = json.loads((path / "config.json").read_text())
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = None if params.get("rope_type") == "default" else params
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def tokens(n: int = 40, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_and_relu_export_round_trips(variant, tmp_path, tokenizer_json):
    model_type, kw, save = VARIANTS[variant]
    reference = hf_model(model_type, **kw)
    src = save_hf(reference, tmp_path / "src", tokenizer_json, save.get("shard"), save.get("legacy", False))
    if save.get("shard"):
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("model-*.safetensors"))) > 2
    x = tokens()

    ours = load_hf_model(src).eval()
    with torch.no_grad():
        expected, got = reference(x).logits, ours(x)
    assert expected.std() > 0.3  # logits far from zero: the comparison means something
    assert max_diff(expected, got) < TOL, variant
    assert ours.cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    assert ours.cfg.n_kv_heads == kw.get("num_key_value_heads", 4)

    # The relufied model (same weights, ReLU gate) exported and loaded by transformers computes our logits.
    relu = SparseLlama(dataclasses.replace(ours.cfg, activation="relu")).eval()
    relu.load_state_dict(ours.state_dict())
    out = export_hf(relu, tmp_path / "out", (src / "tokenizer.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.hidden_act == "relu"
    assert type(back).__name__ == ("Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM")
    with torch.no_grad():
        ours_relu, theirs_relu = relu(x), back(x).logits
    assert max_diff(ours_relu, theirs_relu) < TOL, variant
    assert max_diff(ours_relu, got) > 1e-2  # the ReLU really changed the model
    assert (out / "tokenizer.json").read_text() == tokenizer_json  # tokenizer round trip
    # ... and importing the export gives the same model back.
    again = load_hf_model(out).eval()
    assert again.cfg == relu.cfg
    with torch.no_grad():
        assert torch.equal(again(x), ours_relu)


def test_rotary_tables_match_transformers_rope_variants():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "linear": dict(factor=4.0),
        "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    }
    for rope_type, params in cases.items():
        config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                          rope_theta=500000.0, rope_scaling=dict(rope_type=rope_type, **params))
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        scaling = RopeScalingConfig(type=rope_type, **{k.replace("_position_embeddings", "_seq_len"): v for k, v in params.items()})
        cos, sin = rotary_tables(128, 4096, 500000.0, scaling)
        positions = torch.arange(4096, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq.double())
        assert torch.allclose(cos, angles.cos().float(), atol=2e-4), rope_type  # fp32 inv_freq on their side
        assert torch.allclose(sin, angles.sin().float(), atol=2e-4), rope_type
    plain, _ = rotary_tables(128, 64, 500000.0)
    assert not torch.allclose(plain, rotary_tables(128, 64, 500000.0, RopeScalingConfig(type="linear", factor=2.0))[0])


def test_torch_bin_weights_need_the_opt_in(tmp_path):
    reference = hf_model("llama")
    src = save_hf(reference, tmp_path / "bin")
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin.*allow_torch_bin=true"):
        load_hf(src)
    x = tokens()
    with torch.no_grad():
        assert max_diff(load_hf_model(src, allow_torch_bin=True)(x), reference(x).logits) < TOL


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(architectures=["GPT2LMHeadModel"]), r"config\.json: architecture 'GPT2LMHeadModel' is not supported.*key: architectures"),
        (dict(head_dim=16), r"config\.json: head_dim 16 differs.*key: head_dim"),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported.*key: hidden_act"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), r"RoPE scaling 'yarn' is not supported.*key: rope_parameters\.rope_type"),
        (dict(rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2.0)), r"RoPE scaling 'dynamic' is not supported.*key: rope_scaling\.rope_type"),
        (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4)), r"linear RoPE scaling needs factor.*key: rope_parameters\.factor"),
        (dict(attention_bias=True), r"key: attention_bias"),
        (dict(intermediate_size=48), r"model\.safetensors: 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(64, 32\), config\.json implies \(48, 32\)"),
        (dict(num_hidden_layers=3), r"tensor 'model\.layers\.2\.input_layernorm\.weight' is missing"),
        (dict(num_hidden_layers=1), r"model\.safetensors: unexpected tensor 'model\.layers\.1\."),
        (dict(vocab_size=None), r"config\.json: vocab_size is missing.*key: vocab_size"),
    ],
)
def test_bad_configs_are_refused_naming_file_and_key(changes, needle, tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "m")
    _edit_config(src, **changes)
    with pytest.raises(UserError, match=needle):
        load_hf(src)


def test_active_sliding_window_is_refused_and_an_inactive_one_is_not(tmp_path):
    mistral = save_hf(hf_model("mistral", num_key_value_heads=2, sliding_window=16), tmp_path / "mistral")
    with pytest.raises(UserError, match=r"config\.json: sliding-window attention \(window 16 < 64 positions\).*key: sliding_window"):
        load_hf(mistral)
    _edit_config(mistral, sliding_window=4096)  # longer than the context: masks nothing
    assert load_hf(mistral).config.max_seq_len == 64
    qwen = save_hf(hf_model("qwen2"), tmp_path / "qwen")
    _edit_config(qwen, sliding_window=16, use_sliding_window=False)  # present but switched off, as Qwen2 ships it
    load_hf(qwen)
    _edit_config(qwen, use_sliding_window=True)
    with pytest.raises(UserError, match="key: sliding_window"):
        load_hf(qwen)


def test_missing_shard_missing_weights_and_foreign_tensors(tmp_path):
    src = save_hf(hf_model("qwen2"), tmp_path / "sharded", shard="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=rf"model\.safetensors\.index\.json: shard {shard.name} is missing \(holding 'model\."):
        load_hf(src)
    load_hf(src, weights=False)  # the config alone still reads
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_hf(src)

    src = save_hf(hf_model("llama"), tmp_path / "foreign")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        load_hf(src)
    (src / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json does not exist"):
        load_hf(src)


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    cfg = compose("tiny", ["model.ffn=plain", "model.vocab_size=50"]).model
    with pytest.raises(UserError, match="only gated FFNs"):
        export_hf(SparseLlama(cfg), tmp_path / "plain")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not an empty directory"):
        export_hf(SparseLlama(dataclasses.replace(cfg, ffn="gated")), tmp_path / "full")


# ---- train.init: relufication starts from the imported weights --------------------------------------------
def _init_overrides(small_overrides: list[str], src: Path) -> list[str]:
    keep = [o for o in small_overrides if not o.startswith(("model.", "data.vocab_size"))]
    return keep + [f"train.init={src}", "train.grad_accum=1", "train.max_steps=3", "sparsity.l1_coeff=1e-3"]


def test_relufy_without_init_stops_at_once_saying_so(small_overrides, tmp_path):
    from sparsify_cli.errors import UserError

    with pytest.raises(UserError, match="fine-tunes a pretrained model: give its checkpoint with --init"):
        Trainer(compose("relufy", small_overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_relufy_init_starts_from_the_imported_weights_and_resumes(small_overrides, tmp_path, tokenizer_json):
    reference = hf_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    src = save_hf(reference, tmp_path / "hf", tokenizer_json)
    cfg = compose("relufy", _init_overrides(small_overrides, src))
    trainer = Trainer(cfg, tmp_path / "run")
    model_cfg = trainer.model.cfg
    assert (model_cfg.d_model, model_cfg.n_kv_heads, model_cfg.activation, model_cfg.vocab_size) == (32, 2, "relu", VOCAB)
    assert trainer.data.tokenizer.to_str() == tokenizer_json  # the checkpoint's tokenizer, not a trained one
    imported = load_hf(src).state_dict
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, imported[name]), name

    # Step 1's CE is the CE of transformers' own model with the gate's SiLU swapped for ReLU on that batch.
    position = trainer.sampler.state_dict()
    x, y = trainer.sampler.next_batch()
    trainer.sampler.load_state_dict(position)
    reference.config.hidden_act = "relu"
    relu_reference = type(reference)(reference.config).eval()
    relu_reference.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = F.cross_entropy(relu_reference(x).logits.flatten(0, 1), y.flatten())
    metrics = trainer.train_step()
    assert math.isclose(metrics["ce"], float(expected), rel_tol=1e-5)
    assert metrics["l1"] > 0

    # A run from the init, stopped and resumed, continues (the init's weights are not re-read then).
    trainer.run()
    resumed = Trainer(compose("relufy", _init_overrides(small_overrides, src) + ["train.max_steps=4"]), tmp_path / "run", resume=True)
    assert resumed.step == 3 and resumed.run().step == 4


def test_init_from_a_sparsify_run_and_bad_init_paths(small_overrides, tmp_path, tokenizer_json):
    src = save_hf(hf_model("qwen2"), tmp_path / "hf", tokenizer_json)
    first = Trainer(compose("relufy", _init_overrides(small_overrides, src)), tmp_path / "a")
    first.run()
    second = Trainer(compose("relufy", _init_overrides(small_overrides, tmp_path / "a")), tmp_path / "b")
    assert second.model.cfg == first.model.cfg and second.model.cfg.attn_bias
    for (name, p), q in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(UserError, match="does not exist"):
        Trainer(compose("relufy", _init_overrides(small_overrides, tmp_path / "nope")), tmp_path / "c")
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json; give its tokenizer as data.tokenizer_path"):
        Trainer(compose("relufy", _init_overrides(small_overrides, src)), tmp_path / "d")
