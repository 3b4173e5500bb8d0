"""Quality numbers: held-out cross-entropy (with packed-vs-source agreement) and last-word accuracy.

Last-word accuracy is LAMBADA-style: a held-out passage is cut right before one of its words, and the model is
right when greedy decoding from the context reproduces every token of " word" (the criterion lm-evaluation-
harness calls `is_greedy`; since each step conditions on the correct previous tokens, comparing the argmax at
every target position is the same as decoding). Unlike LAMBADA the passages are not filtered by people for
needing the whole context, so absolute accuracies are low; the numbers are for comparing models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A target: 3+ letters, optionally followed by closing punctuation (left out of the target, as in LAMBADA).
_TARGET = re.compile(r"([A-Za-z]{3,})[.,;:!?'\")\]]*")


@dataclass(frozen=True)
class Passage:
    context: str  # the text before the target word (without the space before it)
    target: str  # " word": the space belongs to the word's first token in a byte-level BPE


@torch.no_grad()
def heldout_pass(
    model: nn.Module,
    windows: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    recorder=None,
    reference: nn.Module | None = None,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """Cross-entropy of `model` over `windows`; with `reference` (a packed model's source checkpoint), also how
    far their logits and CE are apart on the same windows. Returns (quality, agreement or None)."""
    total, count = 0.0, 0
    ref_total, max_diff, diff_sum, diff_n = 0.0, 0.0, 0.0, 0
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        if recorder is not None:
            recorder.begin()
        logits = model(x).float()  # (B, T, V)
        if recorder is not None:
            recorder.end()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
        if reference is not None:
            ref = reference(x).float()  # (B, T, V)
            ref_total += float(F.cross_entropy(ref.flatten(0, 1), y.flatten(), reduction="sum"))
            diff = (logits - ref).abs()
            max_diff = max(max_diff, float(diff.max()))
            diff_sum += float(diff.sum(dtype=torch.float64))
            diff_n += diff.numel()
    ce = total / count
    quality = {"heldout_ce": ce, "heldout_ppl": math.exp(ce), "heldout_tokens": count}
    if reference is None:
        return quality, None
    ref_ce = ref_total / count
    return quality, {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": diff_sum / diff_n,
        "ce_source": ref_ce,
        "ce_packed": ce,
        "ce_diff": ce - ref_ce,
        "tokens": count,
    }


def split_documents(tokens: np.ndarray, eos_id: int, decode: Callable[[list[int]], str]) -> list[str]:
    """Held-out token stream -> the documents' texts (the stream separates documents with eos_id)."""
    cuts = np.flatnonzero(tokens == eos_id)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            text = decode(tokens[start:end].tolist())
            if text.strip():
                docs.append(text)
        start = end + 1
    return docs


def lastword_passages(docs: Sequence[str], n: int, context_words: int = 60, stride_words: int = 40) -> list[Passage]:
    """Up to n passages, spread evenly over all documents (not just the first ones), deterministic.

    Candidates: words matching _TARGET that follow a plain space, with at least `context_words` words before
    them in their document, at least `stride_words` words after the previous candidate.
    """
    candidates: list[Passage] = []
    for doc in docs:
        words = list(re.finditer(r"\S+", doc))
        last = -stride_words
        for i in range(context_words, len(words)):
            if i - last < stride_words:
                continue
            w = words[i]
            m = _TARGET.fullmatch(w.group())
            if m is None or doc[w.start() - 1] != " ":
                continue
            context = doc[words[i - context_words].start() : w.start() - 1]
            candidates.append(Passage(context=context, target=" " + m.group(1)))
            last = i
    if n <= 0 or not candidates:
        return []
    if len(candidates) <= n:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, n).round().astype(int)
    return [candidates[i] for i in picks]


def encode_passages(passages: Sequence[Passage], encode: Callable[[str], list[int]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per passage; the context is cut from the left so that both fit max_len + 1."""
    out = []
    for p in passages:
        ctx, tgt = encode(p.context), encode(p.target)
        keep = max_len + 1 - len(tgt)
        if keep < 1:
            continue
        out.append((ctx[-keep:], tgt))
    return out


@torch.no_grad()
def lastword_accuracy(
    model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]], device: torch.device, batch_size: int = 32
) -> dict[str, Any]:
    """Greedy-match accuracy and mean NLL (nats per target word) over (context ids, target ids) pairs."""
    correct, nll_sum = 0, 0.0
    for b0 in range(0, len(encoded), batch_size):
        batch = encoded[b0 : b0 + batch_size]
        seqs = [c + t for c, t in batch]
        width = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), width, dtype=torch.long)  # right padding: causal attention never sees it
        for i, s in enumerate(seqs):
            x[i, : len(s) - 1] = torch.tensor(s[:-1])
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, T, V)
        for i, (c, t) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) - 1 + len(t), device=logp.device)  # predicts t[0], t[1], …
            tgt = torch.tensor(t, device=logp.device)
            rows = logp[i, pos]  # (len(t), V)
            correct += int(bool((rows.argmax(-1) == tgt).all()))
            nll_sum -= float(rows.gather(1, tgt[:, None]).sum())
    n = len(encoded)
    return {
        "accuracy": correct / n if n else None,
        "mean_nll": nll_sum / n if n else None,
        "passages": n,
        "correct": correct,
    }
