"""evaluate(): load the models, prepare the held-out text once, and measure each model on the same windows.

The report (a JSON-ready dict, schema in docs/EVAL.md):
    settings    seq_len, batch size, tokens, tile choice, compression factors, last-word passages, data
    models[i]   description, quality (CE, ppl, last-word), sparsity (model-level + per layer, tiles),
                agreement (packed dirs), lm_eval (with --tasks)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from sparsify_cli.errors import UserError
from sparsify_cli.eval.activations import COMPRESSIONS, ActivationRecorder, model_sparsity
from sparsify_cli.eval.quality import encode_passages, heldout_pass, lastword_accuracy, lastword_passages, split_documents
from sparsify_cli.eval.targets import EvalTarget, assign_labels, load_target

REPORT_VERSION = 1
LASTWORD_TEXT_TOKENS = 4_000_000


@dataclass
class EvalOptions:
    seq_len: int = 0  # 0: the (first) model's training seq_len
    batch_size: int = 16
    max_tokens: int = 131072  # held-out tokens for CE and sparsity; 0: the whole held-out split
    skip_tokens: int = 0  # start the CE/sparsity windows this far into the held-out split (e.g. past pack's calibration)
    lastword: int = 1000  # last-word passages; 0: skip
    tile: int = 256  # preferred TwELL tile for the overflow analysis
    device: str = "cpu"
    data_overrides: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks
    include_path: str | None = None  # folder of lm-eval task YAMLs
    limit: int | None = None  # lm-eval: documents per task


def evaluate(paths: Sequence[str], options: EvalOptions, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from sparsify_cli.config.compose import data_config
    from sparsify_cli.data import eval_batches, prepare_data
    from sparsify_cli.data.tokenizer import load_tokenizer, tokenizer_hash
    from sparsify_cli.train.loop import resolve_device

    if not paths:
        raise UserError("give at least one checkpoint or packed directory to evaluate")
    if options.tasks:
        import sparsify_cli.eval.harness  # noqa: F401 - a missing lm-eval extra fails here, before any work
    device = resolve_device(options.device)
    torch.manual_seed(0)
    targets = [load_target(p, device) for p in paths]
    assign_labels(targets)

    hashes = [tokenizer_hash(load_tokenizer(str(t.tokenizer_path))) for t in targets]
    for t, h in zip(targets[1:], hashes[1:]):
        if h != hashes[0]:
            raise UserError(
                f"{t.path} and {targets[0].path} use different tokenizers: their per-token cross-entropies are not "
                "comparable; evaluate them separately"
            )
    dcfg = data_config(targets[0].run.get("data", {}), options.data_overrides)
    data = prepare_data(dcfg, tokenizer_path=str(targets[0].tokenizer_path), progress=say)
    for t in targets:
        if t.model_config["vocab_size"] < data.vocab_size:
            raise UserError(f"{t.path}: the model's vocabulary ({t.model_config['vocab_size']}) is smaller than its tokenizer's")

    seq_len = options.seq_len or int(targets[0].run.get("train", {}).get("seq_len", 0)) or 128
    for t in targets:
        if seq_len > t.model_config["max_seq_len"]:
            raise UserError(f"--seq-len {seq_len} exceeds {t.path}'s max_seq_len={t.model_config['max_seq_len']}")
    if options.batch_size <= 0 or min(options.max_tokens, options.lastword, options.skip_tokens) < 0:
        raise UserError("--batch-size must be > 0, --max-tokens, --skip-tokens and --lastword >= 0")
    heldout = data.heldout_tokens
    if len(heldout) - options.skip_tokens < seq_len + 1:
        skipped = f" after skipping {options.skip_tokens}" if options.skip_tokens else ""
        raise UserError(
            f"the held-out text has {len(heldout)} tokens{skipped}, too little to evaluate (one window needs "
            f"{seq_len + 1}); give more text with data.path=… or a shorter --seq-len"
        )
    per_batch = options.batch_size * seq_len
    max_batches = math.ceil(options.max_tokens / per_batch) if options.max_tokens else len(heldout) // per_batch + 1
    windows = list(eval_batches(heldout[options.skip_tokens:], options.batch_size, seq_len, max_batches))
    if options.max_tokens:  # whole windows up to max_tokens (at least one): cut the last batch short
        keep = max(1, options.max_tokens // seq_len)
        windows = [(x[: keep - i * options.batch_size], y[: keep - i * options.batch_size])
                   for i, (x, y) in enumerate(windows) if keep > i * options.batch_size]

    encoded = []
    if options.lastword:
        # Passages come from (at most) the first LASTWORD_TEXT_TOKENS held-out tokens: decoding a huge split
        # whole would cost more than the evaluation itself.
        docs = split_documents(heldout[:LASTWORD_TEXT_TOKENS], data.eos_id, data.tokenizer.decode)
        passages = lastword_passages(docs, options.lastword)
        encoded = encode_passages(passages, lambda s: data.tokenizer.encode(s).ids, seq_len)

    say(f"evaluating {len(targets)} model(s) on {sum(y.numel() for _, y in windows):,} held-out tokens "
        f"({data.description}), {len(encoded)} last-word passages")
    for t in targets:
        calib = t.manifest.get("calibration", {}).get("tokens") if t.kind == "packed" else None
        if calib and options.skip_tokens < calib:
            say(f"note: {t.label} was calibrated on the first {calib:,} held-out tokens, which this evaluation "
                f"includes; --skip-tokens {calib} measures agreement on text the packing never saw")
    models = []
    for t in targets:
        start = time.perf_counter()
        models.append(_evaluate_one(t, windows, encoded, options, device))
        if options.tasks:
            from sparsify_cli.eval.harness import run_tasks

            models[-1]["lm_eval"] = run_tasks(
                t.model, data.tokenizer, data.eos_id, seq_len, options.tasks, options.include_path, options.limit,
                device, options.batch_size,
            )
        say(f"{t.label}: done in {time.perf_counter() - start:.1f} s")
    return {
        "report_version": REPORT_VERSION,
        "settings": {
            "seq_len": seq_len,
            "batch_size": options.batch_size,
            "heldout_tokens": sum(y.numel() for _, y in windows),
            "max_tokens": options.max_tokens,
            "skip_tokens": options.skip_tokens,
            "preferred_tile": options.tile,
            "compressions": list(COMPRESSIONS),
            "lastword_passages": len(encoded),
            "data": data.description,
            "data_fingerprint": data.fingerprint,
            "data_overrides": list(options.data_overrides),
            "device": str(device),
        },
        "models": models,
    }


def _evaluate_one(t: EvalTarget, windows, encoded, options: EvalOptions, device) -> dict[str, Any]:
    recorder = ActivationRecorder(options.tile)
    t.model.set_observer(recorder)
    try:
        quality, agreement = heldout_pass(t.model, windows, device, recorder, t.reference)
    finally:
        t.model.set_observer(None)
    layers = recorder.layer_reports(t.source_widths)
    if not layers:
        raise UserError(f"{t.path}: no FFN activations were observed (is it a sparsify model?)")
    if encoded:
        quality["lastword"] = lastword_accuracy(t.model, encoded, device, options.batch_size)
    else:
        quality["lastword"] = {"accuracy": None, "mean_nll": None, "passages": 0, "correct": 0}
    return {
        **t.describe(),
        "quality": quality,
        "sparsity": {**model_sparsity(layers), "layers": layers},
        "agreement": agreement,
    }
