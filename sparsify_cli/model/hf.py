"""Local Hugging Face checkpoints in and out: Llama-family and Qwen2 decoders <-> SparseLlama.

Import reads a directory as `save_pretrained` writes it: config.json, the weights (model.safetensors, or shards
listed in model.safetensors.index.json) and tokenizer.json. No network and no `transformers`: the config is
mapped field by field onto ModelConfig, and every field that would change the computation in a way our model
cannot reproduce (an active sliding window, a RoPE variant we lack, a head size other than hidden/heads, …) is
refused by name. pytorch_model.bin files are read only when the caller opts in, and then with
torch.load(weights_only=True), which unpickles tensors and plain containers only.

Export writes the inverse: a LlamaForCausalLM directory (Qwen2ForCausalLM when q/k/v carry biases) with
`hidden_act: relu` for a ReLU-gated model, model.safetensors and the tokenizer.json the model was trained with.

    HF name                                         ours
    model.embed_tokens.weight                       embed.weight
    model.layers.{i}.input_layernorm.weight         blocks.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.*     blocks.{i}.attn.{q,k,v,o}.*
    model.layers.{i}.post_attention_layernorm.weight blocks.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.*      blocks.{i}.ffn.{gate,up,down}.*
    model.norm.weight                               norm.weight
    lm_head.weight                                  lm_head.weight (absent when tied to the embedding)

Both sides rotate "halves" of each head (rotate_half), so q/k weights map without a permutation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsify_cli.config.schema import ModelConfig, RopeScalingConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model.transformer import SparseLlama
from sparsify_cli.storage import atomic_directory, write_text

# architectures[0] of config.json -> model_type. Mistral is Llama with an optional sliding window; Qwen2 is
# Llama with biases on q, k and v.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# max_position_embeddings when config.json omits it: the families' own defaults.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_ROPE_TYPES = ("default", "linear", "llama3")

_TOP_LEVEL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
_IN_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.gate_proj": "ffn.gate",
    "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_LAYER_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer older Llama checkpoints saved; recomputed here


@dataclass
class Imported:
    """What starting from a checkpoint needs: the model config, its weights (our names; None when only the
    config was asked for) and the tokenizer.json beside them (None when the directory has none)."""

    config: ModelConfig
    state_dict: Optional[dict[str, torch.Tensor]]
    tokenizer_path: Optional[str]


# ---- import ------------------------------------------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json names a Hugging Face model (model_type or architectures)."""
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def load_hf(path: str | Path, allow_torch_bin: bool = False, weights: bool = True) -> Imported:
    """Read a local Hugging Face directory: config, weights (renamed to ours, shapes checked), tokenizer path."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory (a Hugging Face model directory was expected)")
    config = model_config_from_hf(_read_json(directory / "config.json"), directory / "config.json")
    state = load_hf_weights(directory, config, allow_torch_bin) if weights else None
    tokenizer = directory / "tokenizer.json"
    return Imported(config, state, str(tokenizer) if tokenizer.is_file() else None)


def load_hf_model(path: str | Path, allow_torch_bin: bool = False) -> SparseLlama:
    """A SparseLlama holding a Hugging Face checkpoint's weights (in fp32)."""
    imported = load_hf(path, allow_torch_bin)
    model = SparseLlama(imported.config)
    model.load_state_dict(imported.state_dict)
    return model


def model_config_from_hf(hf: dict[str, Any], source: Path) -> ModelConfig:
    """Map config.json onto ModelConfig; refuse, naming the key, whatever our model would compute differently."""

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"{source}: {why} (key: {key})")

    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"), hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise refuse("architectures", f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise refuse(key, f"{key} is missing or not an integer")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_positions = hf.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[family]
    if hf.get("quantization_config"):
        raise refuse("quantization_config", "quantized checkpoints are not supported; give the full-precision weights")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "relu"):
        raise refuse("hidden_act", f"hidden_act {act!r} is not supported; supported: silu, relu")
    if hf.get("head_dim") not in (None, d // heads):
        raise refuse("head_dim", f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = {d // heads}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", "partial rotary embeddings are not supported")
    if family == "qwen2":
        attn_bias, mlp_bias = True, False  # Qwen2 always has q/k/v biases and no MLP biases
    else:
        if hf.get("attention_bias"):
            raise refuse("attention_bias", "attention_bias=true (a bias on o_proj too) is not supported")
        attn_bias, mlp_bias = False, bool(hf.get("mlp_bias", False))
    _check_sliding_window(hf, family, max_positions, refuse)
    theta, scaling = _rope_from_hf(hf, max_positions, refuse)
    try:
        return ModelConfig(
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            d_ffn=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=max_positions,
            ffn="gated",
            activation=act,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attn_bias=attn_bias,
            mlp_bias=mlp_bias,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
        )
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def _check_sliding_window(hf: dict[str, Any], family: str, max_positions: int, refuse) -> None:
    """A window at least as long as the context masks nothing; a shorter one changes attention: refused."""
    window = hf.get("sliding_window")
    if window is None or window >= max_positions:
        return
    if family == "qwen2" and not hf.get("use_sliding_window") and "sliding_attention" not in (hf.get("layer_types") or []):
        return  # Qwen2 configs carry a window that is off unless use_sliding_window is set
    raise refuse("sliding_window", f"sliding-window attention (window {window} < {max_positions} positions) is not supported")


def _rope_from_hf(hf: dict[str, Any], max_positions: int, refuse) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from rope_theta + rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise refuse(key, "per-layer RoPE parameters are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise refuse(f"{key}.rope_type", f"RoPE scaling {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return theta, RopeScalingConfig()
    try:
        if kind == "linear":
            return theta, RopeScalingConfig(type="linear", factor=float(params["factor"]))
        return theta, RopeScalingConfig(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(params.get("original_max_position_embeddings") or max_positions),
        )
    except KeyError as exc:
        raise refuse(f"{key}.{exc.args[0]}", f"{kind} RoPE scaling needs {exc.args[0]}") from None
    except (TypeError, ValueError, UserError) as exc:
        raise refuse(key, f"bad {kind} RoPE scaling parameters: {exc}") from None


def load_hf_weights(directory: Path, cfg: ModelConfig, allow_torch_bin: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names, every one present with the shape cfg implies."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in _weight_files(directory, allow_torch_bin):
        for hf_key, tensor in _read_weights(file).items():
            if _IGNORED.fullmatch(hf_key):
                continue
            ours = our_name(hf_key)
            if ours is None:
                raise UserError(f"{file}: unexpected tensor {hf_key!r} (not part of a Llama/Qwen2 decoder)")
            state[ours], origin[ours] = tensor, file
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: the head is the embedding (transformers ignores a stored copy too)
    with torch.device("meta"):  # the expected names and shapes, without allocating a model
        expected = {k: tuple(v.shape) for k, v in SparseLlama(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    where = directory / "model.safetensors.index.json" if (directory / "model.safetensors.index.json").is_file() else directory
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{where}: tensor {hf_name(key)!r} is missing")
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{origin[key]}: {hf_name(key)!r} has shape {tuple(state[key].shape)}, config.json implies {shape}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:  # e.g. biases the config says the model does not have
        raise UserError(f"{origin[extra[0]]}: unexpected tensor {hf_name(extra[0])!r} for this config.json")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _weight_files(directory: Path, allow_torch_bin: bool) -> list[Path]:
    """The weight files, in the order transformers prefers them: safetensors first, sharded or not."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if single.endswith(".bin") and ((directory / single).is_file() or (directory / index).is_file()) and not allow_torch_bin:
            raise UserError(
                f"{directory}: only {single} weights (pickle); convert them to safetensors, or opt in to "
                "torch.load(weights_only=True) with train.allow_torch_bin=true"
            )
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = _read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{directory / index}: no weight_map (key: weight_map)")
            shards: dict[str, str] = {}
            for key, shard in weight_map.items():
                shards.setdefault(shard, key)
            for shard, first_key in shards.items():
                if not (directory / shard).is_file():
                    raise UserError(f"{directory / index}: shard {shard} is missing (holding {first_key!r})")
            return [directory / shard for shard in shards]
    raise UserError(f"{directory}: no weights (model.safetensors or model.safetensors.index.json)")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".bin":
            return torch.load(file, map_location="cpu", weights_only=True)
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{file} is corrupt or unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (a Hugging Face model directory needs one)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def our_name(hf_key: str) -> Optional[str]:
    if hf_key in _TOP_LEVEL:
        return _TOP_LEVEL[hf_key]
    m = _HF_LAYER_KEY.fullmatch(hf_key)
    if m and m.group(2) in _IN_LAYER:
        return f"blocks.{m.group(1)}.{_IN_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def hf_name(our_key: str) -> str:
    top = {v: k for k, v in _TOP_LEVEL.items()}
    if our_key in top:
        return top[our_key]
    m = _OUR_LAYER_KEY.fullmatch(our_key)
    inverse = {v: k for k, v in _IN_LAYER.items()}
    if not m or m.group(2) not in inverse:
        raise KeyError(our_key)
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"


# ---- export ------------------------------------------------------------------------------------------------
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(cfg: ModelConfig, dtype: str = "float32", eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """config.json for transformers: Qwen2ForCausalLM when q/k/v have biases, LlamaForCausalLM otherwise."""
    if cfg.ffn != "gated":
        raise UserError("only gated FFNs (gate/up/down, as in Llama) can be exported to Hugging Face; this model has model.ffn=plain")
    if cfg.attn_bias and cfg.mlp_bias:
        raise UserError("a model with both attention and MLP biases has no Hugging Face equivalent (Qwen2 has no MLP biases)")
    arch = "Qwen2ForCausalLM" if cfg.attn_bias else "LlamaForCausalLM"
    rs = cfg.rope_scaling
    rope_scaling = None
    if rs.type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": rs.factor}
    elif rs.type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_seq_len,
        }
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.activation,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # The transformers-4 spelling, which transformers 5 still reads (it converts it to rope_parameters).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "torch_dtype": dtype,
        "eos_token_id": eos_token_id,
    }
    if arch == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=cfg.mlp_bias)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def export_hf(
    model: SparseLlama,
    out: str | Path,
    tokenizer_json: Optional[str] = None,
    dtype: str = "float32",
    eos: Optional[tuple[int, str]] = None,
) -> Path:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors, tokenizer.json); return it.

    eos: (id, token) of the document separator, for config.json's eos_token_id and a tokenizer_config.json that
    lets AutoTokenizer load tokenizer.json as it is (PreTrainedTokenizerFast) with its eos_token set.

    The directory is written atomically (storage.atomic_directory): `out` is complete or as it was. It must
    not exist or be empty.
    """
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not valid; choose one of: {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; choose another output directory")
    config = hf_config(model.cfg, dtype, eos[0] if eos else None)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: transformers re-ties it to model.embed_tokens.weight
        state[hf_name(key)] = tensor.detach().to("cpu", EXPORT_DTYPES[dtype]).contiguous()
    with atomic_directory(out) as tmp:
        write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # transformers checks "pt"
        if tokenizer_json is not None:
            write_text(tmp / "tokenizer.json", tokenizer_json)
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **({"eos_token": eos[1]} if eos else {})}
            write_text(tmp / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    return out
