import pytest
import yaml

from sparsify_cli.config.compose import available_options, available_recipes, compose, expand_sweep
from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.resources import resource_dir


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes(recipe):
    cfg = compose(recipe)
    assert cfg.run_name == recipe
    assert cfg.model.d_model > 0 and cfg.train.max_steps > 0


@pytest.mark.parametrize("group", ["model", "data", "optim", "sparsity", "train", "logger"])
def test_every_group_option_composes(group):
    options = available_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        compose("tiny", [f"{group}={option}"])


def test_recipes_and_conf_are_plain_values():
    """conf/ holds values only: no Python (no _target_, no resolvers other than interpolation)."""
    for path in list(resource_dir("conf").rglob("*.yaml")) + list(resource_dir("recipes").glob("*.yaml")):
        text = path.read_text()
        assert "_target_" not in text and "${eval" not in text, path
        yaml.safe_load(text)


def test_paper_shapes_and_dense_twins():
    for size, layers in (("0.5b", 8), ("1b", 18), ("1.5b", 28), ("2b", 38)):
        sparse, dense = compose(f"paper_{size}"), compose(f"paper_{size}_dense")
        assert (sparse.model.d_model, sparse.model.d_ffn, sparse.model.n_heads) == (2048, 5632, 32)
        assert sparse.model.n_layers == dense.model.n_layers == layers
        assert sparse.sparsity.l1_coeff == 2e-5 and sparse.model.activation == "relu"
        assert dense.sparsity.l1_coeff == 0.0 and dense.model.activation == "silu"


def test_overrides_reach_any_schema_key():
    cfg = compose("tiny", ["train.max_steps=7", "optim.lr=1e-4", "model.ffn=plain", "logger.wandb.mode=disabled"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.model.ffn, cfg.logger.wandb.mode) == (7, 1e-4, "plain", "disabled")
    assert compose("tiny", ["model=paper_1b"]).model.n_layers == 18


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.nope=1", "valid keys of train: max_steps"),
        ("nope=1", "valid keys of the top level"),
        ("train.max_steps=abc", "train.max_steps"),
        ("model=huge", "available: paper_0.5b"),
        ("model.activation=gelu", "choose one of: relu, silu"),
        ("logger.wandb.mode=sometimes", "offline, online, disabled"),
        ("sparsity.l1_coeff=-1", ">= 0"),
        ("train.batch_size=10", None),  # valid alone: not an error
    ],
)
def test_bad_overrides_fail_with_the_valid_choices(override, needle):
    if needle is None:
        compose("tiny", [override])
        return
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        compose("tiny", [override])


def test_unknown_recipe_lists_recipes():
    with pytest.raises(UserError, match="available: .*tiny"):
        compose("nope")


def test_sweep_expansion_is_a_cartesian_product():
    jobs = expand_sweep(["sparsity.l1_coeff=0,1e-5", "train.max_steps=3", "model=tiny,paper_1b"])
    assert len(jobs) == 4
    assert all("train.max_steps=3" in job for job in jobs)
    assert {j[0] for j in jobs} == {"sparsity.l1_coeff=0", "sparsity.l1_coeff=1e-05"}


def test_model_config_checks():
    with pytest.raises(UserError, match="multiple of model.n_heads"):
        ModelConfig(d_model=30, n_layers=1, n_heads=4, d_ffn=8)
    with pytest.raises(UserError, match="n_kv_heads"):
        ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ffn=8, n_kv_heads=3)
    assert ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ffn=8).n_kv_heads == 4
