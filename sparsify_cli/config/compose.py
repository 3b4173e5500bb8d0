"""Compose a run's configuration from a recipe, the conf/ groups and key=value overrides.

The only module that touches Hydra and OmegaConf. Recipes (recipes/*.yaml) are Hydra primary configs whose
defaults list picks options from the conf/ groups; Hydra finds both because conf/ is added to the search path.
The composed YAML is then merged onto the typed schema (schema.RunConfig), so unknown keys and wrong types fail
here, before any work starts, with a one-line UserError.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from sparsify_cli.config.schema import RunConfig
from sparsify_cli.errors import UserError
from sparsify_cli.resources import resource_dir

DEFAULT_RECIPE = "tiny"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in resource_dir("recipes").glob("*.yaml"))


GROUPS = ("model", "data", "optim", "sparsity", "train", "logger")


def available_options(group: str) -> list[str]:
    return sorted(p.stem for p in (resource_dir("conf") / group).glob("*.yaml"))


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(group choices such as `model=paper_1b`, for Hydra; value overrides such as `train.max_steps=5`).

    Value overrides are applied after the schema merge, so any key the schema has can be set, not only the
    keys a YAML file happens to mention, and a key the schema lacks is refused with the valid ones named.
    """
    groups, values = [], []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        (groups if key in GROUPS else values).append(ov)
    return groups, values


def compose_dict(recipe: str = DEFAULT_RECIPE, overrides: list[str] | None = None):
    """Hydra composition of recipe + group choices -> DictConfig (unvalidated)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    recipe_path = Path(recipe)
    if recipe_path.suffix in (".yaml", ".yml"):  # a recipe file of the user's own
        if not recipe_path.is_file():
            raise UserError(f"recipe file {recipe} does not exist")
        recipes_dir, name = recipe_path.resolve().parent, recipe_path.stem
    else:
        recipes_dir, name = resource_dir("recipes"), recipe
        if name not in available_recipes():
            raise UserError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())}")
    for ov in overrides or []:
        group, _, choice = ov.lstrip("+~").partition("=")
        options = available_options(group)
        if group in GROUPS and choice not in options:
            raise UserError(f"unknown {group} option {choice!r}; available: {', '.join(options)}")
    search = [f"hydra.searchpath=[file://{resource_dir('conf')}]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir), version_base="1.3"):
            return compose(config_name=name, overrides=search + list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"cannot compose recipe {recipe!r}: {_one_line(exc)}") from exc
    finally:
        GlobalHydra.instance().clear()


def to_run_config(cfg: Any, value_overrides: list[str] | None = None) -> RunConfig:
    """Validate a composed DictConfig (plus key=value overrides) against the schema; build the RunConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        for ov in value_overrides or []:
            if "=" not in ov:
                raise UserError(f"bad override {ov!r}: expected key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([ov]))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise UserError(f"invalid configuration: {_one_line(exc)}{_valid_keys_hint(exc)}") from exc
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid configuration: {_one_line(exc)}") from exc


def data_config(saved: dict[str, Any], overrides: list[str]) -> "DataConfig":
    """A checkpoint's saved data config with `data.key=value` overrides applied, validated by the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sparsify_cli.config.schema import DataConfig

    bad = [ov for ov in overrides if not ov.startswith("data.") or "=" not in ov]
    if bad:
        raise UserError(f"bad override {bad[0]!r}: only data.key=value overrides apply here")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), saved)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([ov[len("data."):] for ov in overrides]))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid data configuration: {_one_line(exc)}") from exc


def compose(recipe: str = DEFAULT_RECIPE, overrides: list[str] | None = None) -> RunConfig:
    groups, values = split_overrides(list(overrides or []))
    return to_run_config(compose_dict(recipe, groups), values)


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic-sweeper semantics: `k=a,b` and `k=range(...)`/`choice(...)` give the cartesian product.

    Returns one override list per job; overrides without a sweep appear in every job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(f"bad override: {_one_line(exc)}") from exc
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([ov.input_line])  # verbatim: a job's non-swept overrides equal the user's
    return [list(job) for job in itertools.product(*axes)]


def _valid_keys_hint(exc: Exception) -> str:
    """'; valid keys of train: max_steps, ...' for an unknown key, found by walking the schema."""
    import dataclasses

    key = getattr(exc, "full_key", "") or ""
    node: Any = RunConfig
    for part in key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return ""
        node = fields[part].default_factory() if callable(fields[part].default_factory) else fields[part].type
        node = type(node) if dataclasses.is_dataclass(node) and not isinstance(node, type) else node
        if isinstance(node, str):  # postponed annotations: resolve by name from the schema module
            from sparsify_cli.config import schema

            node = getattr(schema, node, None)
    if not dataclasses.is_dataclass(node):
        return ""
    section = key.rsplit(".", 1)[0] if "." in key else "the top level"
    return f"; valid keys of {section}: {', '.join(f.name for f in dataclasses.fields(node))}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # OmegaConf appends "full_key: ... object_type=..." lines; the first line plus the key is what users need.
    key = next((line.split(":", 1)[1].strip() for line in text if line.startswith("    full_key:")), "")
    head = text[0] if text else type(exc).__name__
    return f"{head} (key: {key})" if key and key not in head else head
