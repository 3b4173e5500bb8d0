import json
import shutil

import pytest
from typer.testing import CliRunner

from sparsify_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help():
    r = invoke("eval", "--help")
    assert r.exit_code == 0
    for word in ("--json", "--plots", "--tasks", "--max-tokens", "--lastword", "data.key=value"):
        assert word in r.output


def test_one_model_matches_training_and_writes_every_number(tiny_runs, tmp_path):
    run, result = tiny_runs["sparse"], tiny_runs["results"]["sparse"]
    out = tmp_path / "r.json"
    # The trainer's final eval window set: 2 batches of 4 windows of 32 tokens.
    r = invoke("eval", run, "--json", out, "--batch-size", 4, "--max-tokens", 256, "--lastword", 20)
    assert r.exit_code == 0, r.output
    for word in ("held-out quality", "FFN activations per layer", "TwELL capacity", "C8", "sparse"):
        assert word in r.output
    report = json.loads(out.read_text())
    (m,) = report["models"]
    assert report["settings"]["heldout_tokens"] == 256 and report["settings"]["seq_len"] == 32
    assert m["quality"]["heldout_ce"] == pytest.approx(result.heldout_ce, rel=1e-6)
    assert m["sparsity"]["sparsity"] == pytest.approx(result.sparsity["sparsity"], rel=1e-6)
    for ours, theirs in zip(m["sparsity"]["layers"], result.layers):
        assert ours["mean_active"] == pytest.approx(theirs["mean_active"])
        assert ours["max_active"] == theirs["max_active"]
        assert ours["p99_active"] <= ours["max_active"]
        assert ours["tiles"]["tile"] == 96 and set(ours["tiles"]["overflow"]) == {"8", "4", "2"}
    assert m["quality"]["lastword"]["passages"] == 20 and 0 <= m["quality"]["lastword"]["accuracy"] <= 1
    assert m["l1_coeff"] == 0.02 and m["agreement"] is None


def test_side_by_side_with_plots(tiny_runs, tmp_path):
    plots = tmp_path / "plots"
    r = invoke("eval", tiny_runs["sparse"] / "checkpoint", tiny_runs["relu"], "--plots", plots, "--json",
               tmp_path / "r.json", "--lastword", 20, "--max-tokens", 1024, "--no-layers")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in report["models"]] == ["sparse", "relu"]
    assert [m["l1_coeff"] for m in report["models"]] == [0.02, 0.0]
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["active_hist.png", "active_per_layer.png", "tile_overflow.png", "tradeoff.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert "FFN activations per layer" not in r.output


def test_bad_input_gives_one_line_errors(tiny_runs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short"
    short.mkdir()
    for i in range(20):  # 20 one-line documents: the held-out one is far shorter than a window
        (short / f"d{i:02d}.txt").write_text("the king and the queen.")
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    cases = [
        ([not_ckpt], "is not a sparsify checkpoint"),
        ([tmp_path / "missing"], "does not exist"),
        ([tiny_runs["sparse"], f"data.path={empty}"], "empty"),
        ([tiny_runs["sparse"], f"data.path={short}"], "too little to evaluate"),
        ([tiny_runs["sparse"], "data.bogus=1"], "data"),
        ([tiny_runs["sparse"], "--seq-len", "100000"], "max_seq_len"),
    ]
    for args, needle in cases:
        r = invoke("eval", *args, "--lastword", 0)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_models_with_different_tokenizers_are_not_compared(tiny_runs):
    other = tiny_runs["root"] / "other_tokenizer"
    if not other.exists():
        tiny_runs["train"](other, **{"data.vocab_size": "280", "train.max_steps": "1"})
    r = invoke("eval", tiny_runs["sparse"], other, "--lastword", 0)
    assert r.exit_code == 2 and "different tokenizers" in r.output, r.output


def test_a_run_dir_copy_is_the_same_model(tiny_runs, tmp_path):
    # Two paths, same weights: identical numbers (the evaluation is deterministic and shares its windows).
    copy = tmp_path / "copy"
    shutil.copytree(tiny_runs["sparse"], copy)
    out = tmp_path / "r.json"
    r = invoke("eval", tiny_runs["sparse"], copy, "--json", out, "--lastword", 10, "--max-tokens", 512, "--no-layers")
    assert r.exit_code == 0, r.output
    a, b = json.loads(out.read_text())["models"]
    assert a["label"] != b["label"]
    assert a["quality"] == b["quality"] and a["sparsity"] == b["sparsity"]
