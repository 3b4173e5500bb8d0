"""train.compile (train/compile.py): the compiled blocks compute what the eager ones do, the FFN stays eager.

On the CPU the wiring runs with torch.compile's "eager" backend (graph capture without code generation, so no
C++ compiler or Triton is needed and the numbers are bit-identical); the inductor build runs in tests/gpu."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparsify_cli.config.compose import compose
from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model import SparseLlama
from sparsify_cli.sparsity import SparsityTracker
from sparsify_cli.train import compile as compiling
from sparsify_cli.train.loop import Trainer


@pytest.fixture
def eager_backend(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    yield
    torch._dynamo.reset()


def _step(model: SparseLlama, tokens: torch.Tensor, ce) -> tuple[float, dict[str, torch.Tensor], SparsityTracker]:
    model.zero_grad()
    tracker = SparsityTracker(model.cfg.n_layers, model.cfg.d_ffn, dead_window_tokens=4)
    model.set_observer(tracker)
    tracker.begin_forward()
    logits = model(tokens[:, :-1])
    loss = ce(logits, tokens[:, 1:]) + 0.5 * tracker.end_forward()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, tracker


@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_blocks_give_the_eager_loss_gradients_and_statistics(eager_backend, sparse):
    torch.manual_seed(0)
    model = SparseLlama(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16))
    for ffn in model.ffns:  # sparse: the pure-torch sparse training op, with a dense tail for wide rows
        ffn.sparse_train, ffn.sparse_width = sparse, 8
    compiled = copy.deepcopy(model)
    ce = compiling.compile_blocks(compiled)
    tokens = torch.randint(0, 50, (3, 13))
    for _ in range(2):  # the second call runs the cached graphs
        loss_e, grads_e, tr_e = _step(model, tokens, compiling.cross_entropy)
        loss_c, grads_c, tr_c = _step(compiled, tokens, ce)
        assert loss_c == loss_e
        for name, g in grads_e.items():
            assert torch.equal(grads_c[name], g), name
        assert torch.equal(tr_c.last_fired, tr_e.last_fired)
        assert [s.mean_active for s in tr_c.layer_stats()] == [s.mean_active for s in tr_e.layer_stats()]
    assert list(compiled.state_dict()) == list(model.state_dict())  # checkpoints keep their keys


def test_the_ffn_is_not_traced(monkeypatch):
    """The block is captured in graphs, the FFN is not: it runs eagerly between them, and its observer sees real
    tensors, not graph proxies."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", capture)
    torch.manual_seed(0)
    model = SparseLlama(ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16))
    seen = []
    model.set_observer(lambda layer, h: seen.append((layer, type(h), torch.compiler.is_compiling())))
    compiling.compile_blocks(model)
    model(torch.randint(0, 50, (2, 8)))
    torch._dynamo.reset()
    assert seen == [(0, torch.Tensor, False)]
    assert graphs and any("scaled_dot_product_attention" in code for code in graphs)
    assert not any("modules_ffn_modules" in code for code in graphs)  # no FFN weight (gate, up, down) in a graph


def test_train_compile_runs_and_matches_eager_training(small_overrides, tmp_path, eager_backend):
    base = small_overrides + ["train.max_steps=3"]
    plain = Trainer(compose("tiny", base), tmp_path / "plain")
    plain.run()
    compiled = Trainer(compose("tiny", base + ["train.compile=true"]), tmp_path / "compiled")
    result = compiled.run()
    assert result.step == 3
    for (name, p), q in zip(plain.model.named_parameters(), compiled.model.parameters()):
        assert torch.equal(p, q), name


def test_compile_without_a_cpu_compiler_stops_with_the_reason(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compiling.check_can_compile(torch.device("cpu"))


def test_cross_entropy_is_the_fp32_token_mean():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    y = torch.randint(0, 7, (2, 5))
    want = F.cross_entropy(logits.float().reshape(10, 7), y.reshape(10))
    assert torch.equal(compiling.cross_entropy(logits, y), want)


def test_compiled_blocks_under_activation_checkpointing(eager_backend):
    """checkpoint(block) around a compiled block: the recomputed forward runs the same graphs and the FFN's
    observer does not count twice; loss, gradients and statistics equal the eager checkpointed model's."""
    torch.manual_seed(0)
    model = SparseLlama(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16))
    for ffn in model.ffns:
        ffn.sparse_train, ffn.sparse_width = True, 8
    model.activation_checkpointing = True
    compiled = copy.deepcopy(model)
    ce = compiling.compile_blocks(compiled)
    tokens = torch.randint(0, 50, (3, 13))
    loss_e, grads_e, tr_e = _step(model, tokens, compiling.cross_entropy)
    loss_c, grads_c, tr_c = _step(compiled, tokens, ce)
    assert loss_c == loss_e
    for name, g in grads_e.items():
        assert torch.equal(grads_c[name], g), name
    assert tr_c.tokens_seen == tr_e.tokens_seen
    assert [s.mean_active for s in tr_c.layer_stats()] == [s.mean_active for s in tr_e.layer_stats()]


def test_compiled_run_resumes_exactly(small_overrides, tmp_path, eager_backend):
    """A compiled run's checkpoint keeps the model's keys, and resuming it (compiled again) continues exactly."""
    base = small_overrides + ["train.compile=true"]
    straight = Trainer(compose("tiny", base + ["train.max_steps=4"]), tmp_path / "a")
    straight.run()
    Trainer(compose("tiny", base + ["train.max_steps=2"]), tmp_path / "b").run()
    resumed = Trainer(compose("tiny", base + ["train.max_steps=4"]), tmp_path / "b", resume=True)
    resumed.run()
    assert resumed.step == straight.step == 4
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
