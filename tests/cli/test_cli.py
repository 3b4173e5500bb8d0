import json

from typer.testing import CliRunner

from sparsify_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_explains_itself():
    top = invoke("--help")
    assert top.exit_code == 0 and "train" in top.output
    train = invoke("train", "--help")
    assert train.exit_code == 0
    for word in ("--recipe", "--resume", "--multirun", "sparsity.l1_coeff", "logger.wandb.mode"):
        assert word in train.output


def test_list_recipes_and_show_config():
    out = invoke("train", "--list-recipes")
    assert out.exit_code == 0 and "tiny" in out.output and "paper_2b_dense" in out.output
    shown = invoke("train", "--show-config", "train.max_steps=7")
    assert shown.exit_code == 0 and "max_steps: 7" in shown.output


def test_five_step_run_then_resume(small_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = [o for o in small_overrides if not o.startswith("train.max_steps")]
    r = invoke("train", "--out", str(out), *overrides, "train.max_steps=5")
    assert r.exit_code == 0, r.output
    assert "held-out CE" in r.output and "FFN sparsity" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 5 and 0 <= summary["heldout_sparsity"] <= 1
    again = invoke("train", "--out", str(out), *overrides, "train.max_steps=7", "--resume")
    assert again.exit_code == 0, again.output
    assert "resumed" in again.output and json.loads((out / "summary.json").read_text())["step"] == 7


def test_multirun_gives_each_job_its_own_directory(small_overrides, tmp_path):
    out = tmp_path / "sweep"
    r = invoke("train", "-m", "--out", str(out), *small_overrides, "train.max_steps=1", "sparsity.l1_coeff=0,1e-3")
    assert r.exit_code == 0, r.output
    dirs = sorted(p.name for p in out.iterdir())
    assert dirs == ["0_sparsity.l1_coeff=0", "1_sparsity.l1_coeff=0.001"]
    assert all((out / d / "checkpoint" / "model.safetensors").is_file() for d in dirs)


def test_sweep_without_multirun_is_refused():
    r = invoke("train", "sparsity.l1_coeff=0,1e-3")
    assert r.exit_code == 2 and "--multirun" in r.output


def test_bad_input_gives_one_line_errors(tmp_path):
    cases = [
        (["--recipe", "nope"], "unknown recipe"),
        (["train.bogus=1"], "valid keys of train"),
        (["model.activation=gelu"], "choose one of: relu, silu"),
        ([f"data.path={tmp_path / 'missing'}"], "does not exist"),
        (["--out", str(tmp_path / "x"), "--resume"], "no checkpoint"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    cases.append(([f"data.path={empty}", f"data.cache_dir={tmp_path}"], "empty"))
    for args, needle in cases:
        r = invoke("train", *args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
        assert "Traceback" not in r.output
