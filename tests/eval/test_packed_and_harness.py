"""Packed directories (needs sparsify_cli.pack) and the lm-evaluation-harness adapter (needs the lm-eval extra)."""

import json
import shutil
import sys

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.cli.app import app
from sparsify_cli.errors import UserError
from sparsify_cli.eval.targets import load_target

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def packed(tiny_runs, tmp_path_factory):
    pack = pytest.importorskip("sparsify_cli.pack")
    out = tmp_path_factory.mktemp("packed") / "tiny.packed"
    pack.pack_checkpoint(tiny_runs["sparse"], out, pack.PackOptions(calib_tokens=256))
    return out


def test_packed_dir_against_its_source(tiny_runs, packed, tmp_path):
    from sparsify_cli.data import eval_batches, prepare_data
    from sparsify_cli.config.compose import data_config
    from sparsify_cli.pack import load_packed
    from sparsify_cli.train.checkpoint import load_model

    out = tmp_path / "r.json"
    r = invoke("eval", packed, tiny_runs["sparse"], "--json", out, "--lastword", 10, "--max-tokens", 512,
               "--batch-size", 4)
    assert r.exit_code == 0, r.output
    assert "(packed)" in r.output and "max |Δlogit|" in r.output
    pk, src = json.loads(out.read_text())["models"]
    assert (pk["kind"], src["kind"]) == ("packed", "checkpoint")
    a = pk["agreement"]
    # The source's own pass and the agreement's source CE are the same computation on the same windows.
    assert a["ce_source"] == pytest.approx(src["quality"]["heldout_ce"], rel=1e-9)
    assert a["ce_packed"] == pk["quality"]["heldout_ce"] and a["tokens"] == 512
    # An independent computation of the largest logit difference.
    model, manifest = load_packed(packed, kernels="torch")
    source, config = load_model(tiny_runs["sparse"])
    data = prepare_data(data_config(config["run"]["data"], []), tokenizer_path=str(packed / "tokenizer.json"))
    with torch.no_grad():
        diffs = [float((model(x) - source(x)).abs().max()) for x, _ in eval_batches(data.heldout_tokens, 4, 32, 4)]
    assert a["max_abs_logit_diff"] == pytest.approx(max(diffs), rel=1e-5, abs=1e-7)
    assert "was calibrated on the first 256" in r.output  # the default windows overlap the calibration text
    unseen = invoke("eval", packed, "--json", out, "--lastword", 0, "--max-tokens", 128, "--batch-size", 4,
                    "--skip-tokens", 256)
    assert unseen.exit_code == 0, unseen.output
    assert "was calibrated" not in unseen.output
    report = json.loads(out.read_text())
    assert report["settings"]["skip_tokens"] == 256
    (x, y), = eval_batches(data.heldout_tokens[256:], 4, 32, 1)
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(source(x).flatten(0, 1), y.flatten()))
    assert report["models"][0]["agreement"]["ce_source"] == pytest.approx(ce, rel=1e-6)
    # Sparsity is reported against the source width (pruned neurons count as dead), per layer.
    assert [l["d_ffn"] for l in pk["sparsity"]["layers"]] == [96, 96]
    assert [l["d_ffn_run"] for l in pk["sparsity"]["layers"]] == [l["width"] for l in manifest["layers"]]
    for lp, ls, lm in zip(pk["sparsity"]["layers"], src["sparsity"]["layers"], manifest["layers"]):
        assert lp["dead"] >= lm["d_ffn_source"] - lm["d_ffn"]  # at least the pruned ones
        assert lp["mean_active"] <= ls["mean_active"] + 1e-9  # pruning never adds activity


def test_packed_dir_whose_source_is_gone(tiny_runs, tmp_path):
    pack = pytest.importorskip("sparsify_cli.pack")
    moved = tmp_path / "moved"
    shutil.copytree(tiny_runs["sparse"], moved)
    pack.pack_checkpoint(moved, tmp_path / "p", pack.PackOptions(calib_tokens=128))
    shutil.rmtree(moved)
    r = invoke("eval", tmp_path / "p", "--lastword", 0)
    assert r.exit_code == 2 and "which is gone" in r.output, r.output


def test_packed_dir_without_sparsify_pack(monkeypatch, tmp_path):
    # An installation whose sparsify has no `pack` module: a packed dir gets a clear error, not "not a checkpoint".
    monkeypatch.setitem(sys.modules, "sparsify_cli.pack", None)  # makes `import sparsify_cli.pack` fail
    fake = tmp_path / "some.packed"
    fake.mkdir()
    (fake / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="packed directories need sparsify pack"):
        load_target(fake, torch.device("cpu"))


def _write_task(folder, passages):
    folder.mkdir()
    data = folder / "lastword.jsonl"
    data.write_text("".join(json.dumps({"context": p.context, "target": p.target}) + "\n" for p in passages))
    (folder / "lastword.yaml").write_text(f"""task: sparsify_test_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")


def test_lm_eval_adapter_agrees_with_our_last_word_scorer(tiny_runs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import math

    from sparsify_cli.config.compose import data_config
    from sparsify_cli.data import prepare_data
    from sparsify_cli.eval.quality import lastword_passages, split_documents
    from sparsify_cli.train.checkpoint import load_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _, config = load_model(tiny_runs["relu"])
    data = prepare_data(data_config(config["run"]["data"], []), tokenizer_path=str(tiny_runs["relu"] / "checkpoint" / "tokenizer.json"))
    docs = split_documents(data.heldout_tokens, data.eos_id, data.tokenizer.decode)
    passages = lastword_passages(docs, 20)  # the passages `sparsify eval --lastword 20` scores itself
    assert len(passages) == 20
    _write_task(tmp_path / "tasks", passages)
    out = tmp_path / "r.json"
    r = invoke("eval", tiny_runs["relu"], "--lastword", 20, "--max-tokens", 256, "--json", out,
               "--tasks", "sparsify_test_lastword", "--include-path", tmp_path / "tasks", "--no-layers")
    assert r.exit_code == 0, r.output
    (m,) = json.loads(out.read_text())["models"]
    ours, theirs = m["quality"]["lastword"], m["lm_eval"]["sparsify_test_lastword"]
    assert theirs["acc"] == pytest.approx(ours["accuracy"])
    assert math.log(theirs["perplexity"]) == pytest.approx(ours["mean_nll"], rel=1e-4)
    assert "lm-eval sparsify_test_lastword" in r.output

    bad = invoke("eval", tiny_runs["relu"], "--tasks", "no_such_task_xyz", "--include-path", tmp_path / "tasks")
    assert bad.exit_code == 2 and "unknown lm-eval task" in bad.output, bad.output


def test_tasks_without_lm_eval_is_a_clear_error(tiny_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "sparsify_cli.eval.harness", raising=False)
    r = invoke("eval", tiny_runs["relu"], "--tasks", "anything")
    assert r.exit_code == 2 and "lm-eval" in r.output and "pip install" in r.output, r.output


class _Req:
    def __init__(self, *args):
        self.args = args


def test_lm_eval_rolling_and_generation(tiny_runs):
    pytest.importorskip("lm_eval")
    from sparsify_cli.data.tokenizer import load_tokenizer
    from sparsify_cli.eval.harness import SparsifyLM
    from sparsify_cli.train.checkpoint import load_model

    model, _ = load_model(tiny_runs["relu"])
    model.eval()
    tok = load_tokenizer(str(tiny_runs["relu"] / "checkpoint" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    text = "the king and the queen speak of love and death when the night is fair"
    ids = [eos] + tok.encode(text).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
    direct = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert len(ids) <= 64
    lm = SparsifyLM(model, tok, eos, max_length=64, batch_size=3)
    (rolling,) = lm.loglikelihood_rolling([_Req(text)])
    assert rolling == pytest.approx(direct, rel=1e-5)  # one window: every token scored once, from the EOS on
    short = SparsifyLM(model, tok, eos, max_length=4)
    (windowed,) = short.loglikelihood_rolling([_Req(text)])
    assert windowed < 0 and windowed != pytest.approx(direct, rel=1e-6)  # 4-token windows: less context, other sum

    # Greedy generation = the argmax chain, cut at the first `until` string.
    prompt = "the king and the"
    seq = tok.encode(prompt).ids
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    greedy = tok.decode(seq[len(tok.encode(prompt).ids):])
    (out,) = lm.generate_until([_Req(prompt, {"until": ["\n\n\n\n"], "max_gen_toks": 6})])
    assert out == greedy
    stop = greedy.strip().split(" ")[0]
    if stop:
        (cut,) = lm.generate_until([_Req(prompt, {"until": [stop], "max_gen_toks": 6})])
        assert stop not in cut and greedy.startswith(cut)
