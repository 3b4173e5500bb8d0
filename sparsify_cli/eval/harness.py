"""lm-evaluation-harness adapter: our models as an `lm_eval` LM (needs the lm-eval extra).

    pip install 'sparsify-cli[lm-eval]'
    sparsify eval runs/tiny --tasks my_task --include-path my_tasks/     # task YAMLs with local data files

Tokenization follows lm-eval's Hugging Face model: the context's trailing spaces move to the continuation, the
continuation's tokens are those of encode(context + continuation) after encode(context), and the context is cut
from the left to fit the model's window. An empty context starts from the end-of-document token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sparsify_cli.errors import UserError

try:
    from lm_eval.api.model import LM
except ImportError as exc:  # pragma: no cover - exercised by the CLI error test when the extra is absent
    raise UserError("--tasks needs lm-evaluation-harness: pip install 'sparsify-cli[lm-eval]'") from exc


class SparsifyLM(LM):
    """A sparsify model (checkpoint or packed) behind lm-eval's three request types."""

    def __init__(self, model, tokenizer, eos_id: int, max_length: int, device="cpu", batch_size: int = 16,
                 max_gen_toks: int = 32):
        super().__init__()
        self.model, self.tok, self.eos_id = model.eval(), tokenizer, eos_id
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self._device = torch.device(device)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    # ---- scoring -------------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self.encode(continuation)
        return (ctx or [self.eos_id]), cont

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) for each (ctx ids, cont ids)."""
        results: list[tuple[float, bool]] = []
        for b0 in range(0, len(pairs), self.batch_size):
            batch = []
            for ctx, cont in pairs[b0 : b0 + self.batch_size]:
                if not cont:
                    raise UserError("lm-eval request with an empty continuation")
                seq = (ctx + cont)[-(self.max_length + 1):]
                batch.append((seq, len(cont)))
            width = max(len(s) for s, _ in batch) - 1
            x = torch.zeros(len(batch), width, dtype=torch.long)  # right padding (causal: never attended to)
            for i, (s, _) in enumerate(batch):
                x[i, : len(s) - 1] = torch.tensor(s[:-1])
            logp = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1)  # (B, T, V)
            for i, (s, n) in enumerate(batch):
                rows = logp[i, len(s) - 1 - n : len(s) - 1]  # (n, V): predictions of the continuation
                tgt = torch.tensor(s[-n:], device=rows.device)
                results.append((float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._split(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            ids = [self.eos_id] + self.encode(r.args[0])
            total = 0.0
            # Disjoint windows of max_length predictions, each with as much preceding context as fits.
            for start in range(1, len(ids), self.max_length):
                end = min(start + self.max_length, len(ids))
                ctx_start = max(0, end - self.max_length - 1)
                total += self._score([(ids[ctx_start:start], ids[start:end])])[0][0]
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.encode(context) or [self.eos_id]
            new: list[int] = []
            for _ in range(int(kwargs.get("max_gen_toks", self.max_gen_toks))):
                window = (ids + new)[-self.max_length:]
                nxt = int(self.model(torch.tensor([window], device=self._device))[0, -1].argmax())
                if nxt == self.eos_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            text = self.tok.decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_tasks(model, tokenizer, eos_id: int, max_length: int, tasks: Sequence[str], include_path: str | None,
              limit: int | None, device, batch_size: int = 16) -> dict[str, Any]:
    """Run lm-eval tasks on one model; {task: {metric: value}} (lm-eval's `results`, stderr entries kept)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # local tasks only when they cover the request: indexing lm-eval's own tasks takes a while
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        where = f" in {include_path} or" if include_path else ""
        raise UserError(f"unknown lm-eval task(s) {', '.join(missing)}: not found{where} among lm-eval's tasks")
    lm = SparsifyLM(model, tokenizer, eos_id, max_length, device, batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)
    except (ConnectionError, OSError) as exc:
        raise UserError(f"lm-eval could not load a task's data ({exc}); tasks must have their data available locally") from exc
    return {task: _clean(metrics) for task, metrics in results["results"].items()}


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's 'acc,none' keys -> 'acc' (the filter name is kept when it is not 'none')."""
    return {k.removesuffix(",none"): v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v != "N/A"}
