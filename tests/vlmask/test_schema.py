"""``vlmask validate``: every name and argument checked against factory signatures, all errors at once."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
from pydantic import Field

from vlmask.config import load_recipe
from vlmask import hookimpl
from vlmask.plugins import default_plugins, load_plugins
from vlmask.schema import CHOICES, type_matches, validate

RECIPES = Path(__file__).parents[2] / "recipes"


def shipped_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.relative_to(RECIPES).parts)


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert validate(recipe, default_plugins().registry) == []


def test_bad_recipe_lists_every_error_with_file_and_key(tmp_path):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(
        f"base: [{RECIPES / 'mae.yaml'}]\n"
        "masker: {name: tubes, ratio: 0.9}\n"          # unknown plugin name
        "model:\n"
        "  predictor: {name: transformer, dpeth: 2}\n"  # misspelt argument
        "targets:\n"
        "  pixels: {name: normalized_pixels, eps: fast}\n"  # wrong type
        "train:\n"
        "  batch_size: many\n"                           # wrong engine type
        "  precison: bf16\n"                             # misspelt engine key
    )
    problems = validate(load_recipe(recipe_file), default_plugins().registry)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "bad.yaml:2: key masker.name: unknown masker 'tubes'. Did you mean 'tube'?" in text
    assert "bad.yaml:4: key model.predictor.dpeth: predictor 'transformer' has no argument 'dpeth' (did you mean 'depth'?)" in text
    assert "bad.yaml:6: key targets.pixels.eps: 'fast' is not of type float" in text
    assert "bad.yaml:8: key train.batch_size: 'many' is not of type int" in text
    assert "bad.yaml:9: unknown key train.precison (did you mean 'precision'?)" in text


def test_command_line_errors_name_the_override():
    problems = validate(load_recipe(RECIPES / "mae.yaml", ["masker.ratio=high"]), default_plugins().registry)
    assert problems == ["command line: masker.ratio=high: key masker.ratio: 'high' is not of type float (masker 'tube')"]


def test_loss_weights_must_match_loss_terms():
    problems = validate(load_recipe(RECIPES / "mae.yaml", ["loss_weights.clip=1.0", "~loss_weights.pixels"]), default_plugins().registry)
    text = "\n".join(problems)
    assert "loss term 'pixels' has no weight" in text
    assert "key loss_weights.clip: weight for a loss term that no target or head produces" in text


@pytest.mark.parametrize(
    "value, annotation, ok",
    [
        (1, int, True), (True, int, False), (1, float, True), ("a", float, False), (None, Optional[int], True),
        ([0.5, 1.0], tuple[float, float], True), ([0.5], tuple[float, float], False), ([1, 2], list[int], True),
        ("l1", Literal["l1", "mse"], True), ("l2", Literal["l1", "mse"], False), ("x", str | int, True),
    ],
)
def test_type_matches(value, annotation, ok):
    assert type_matches(value, annotation) is ok


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_closed_choice_is_checked(key):
    problems = validate(load_recipe(RECIPES / "mae.yaml", [f"{key}=nonsense"]), default_plugins().registry)
    assert len(problems) == 1 and f"key {key}: 'nonsense' is not one of" in problems[0], problems


class BandMasker:
    """A masker stating its argument's range in its signature (pydantic ``Field`` in ``Annotated``)."""

    def __init__(self, keep: "Annotated[float, Field(gt=0, lt=1)]" = 0.5, width: int = 2) -> None:
        self.keep, self.width = keep, width


class BandPlugin:
    @hookimpl
    def vlmask_register_plugins(self, register):
        register("masker", "band", BandMasker)


def test_plugin_argument_ranges_and_types_come_from_pydantic_annotations():
    registry = load_plugins(extra=[("band", BandPlugin())]).registry
    problems = validate(load_recipe(RECIPES / "mae.yaml", ["masker={name: band, keep: 1.5, width: true}"]), registry)
    assert problems == [
        "command line: masker={name: band, keep: 1.5, width: true}: key masker.keep: 1.5 should be less than 1 (masker 'band')",
        "command line: masker={name: band, keep: 1.5, width: true}: key masker.width: True is not of type int (masker 'band')",
    ]
    assert validate(load_recipe(RECIPES / "mae.yaml", ["masker={name: band, keep: 0.25}"]), registry) == []


def test_a_replaced_plugin_node_forgets_the_files_provenance_of_its_old_arguments():
    recipe = load_recipe(RECIPES / "mae.yaml", ["masker={name: random}"])
    assert recipe.where("masker.ratio") == "command line: masker={name: random}"


#: Modules that may read a recipe's values directly: the settings modules themselves.
SETTINGS_MODULES = {"schema.py", "sections.py", "config.py"}


def raw_recipe_reads(source: str) -> list[int]:
    """Lines of ``<...>recipe.get(...)`` calls (``recipe``, ``self.recipe``, ``run.recipe`` ...)."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name == "recipe":
                lines.append(node.lineno)
    return lines


def test_raw_recipe_reads_finds_them() -> None:
    assert raw_recipe_reads("seed = recipe.get('seed', 0)\nx = run.recipe.get('a')\ny = cfg.get('b')\n") == [1, 2]


def test_the_engine_reads_recipe_values_only_through_the_typed_settings() -> None:
    """Every default lives in one typed model (``vlmask.schema.settings`` / ``top_settings``):
    a ``recipe.get(key, default)`` elsewhere is a second default that can disagree."""
    package = Path(__file__).parents[2] / "vlmask"
    found = [f"{path.name}:{line}" for path in sorted(package.glob("*.py")) if path.name not in SETTINGS_MODULES
             for line in raw_recipe_reads(path.read_text())]
    assert found == [], f"read these through vlmask.schema.settings(recipe, section) / top_settings(recipe): {found}"


def test_top_settings_have_the_engine_defaults_and_every_top_level_key(tmp_path) -> None:
    from vlmask.schema import TOP_LEVEL, TopSettings, settings, top_settings

    recipe = load_recipe(RECIPES / "mae.yaml")
    top = top_settings(recipe)
    assert set(TOP_LEVEL) == {f for f in TopSettings.__dataclass_fields__}
    assert (TopSettings().seed, TopSettings().device) == (0, "auto")
    assert top.masker["name"] == recipe.get("masker.name") and list(top.terms("targets")) == ["pixels"]
    assert settings(recipe, "record").total_steps is None and settings(recipe, "record").data == {}


def test_context_features_need_a_predictor_that_aggregates_a_context(tmp_path):
    """``evaluation.features: context`` probes DPC's and MemDPC's aggregated context c_t
    (vlmask.kinds.ContextFeatures): refused, in one line naming file and key, for FILS' predictor
    (it decodes masked tokens), for a recipe without predictor and for an unknown choice."""
    registry = default_plugins().registry
    recipe_file = tmp_path / "fils_context.yaml"
    recipe_file.write_text(f"base: [{RECIPES / 'fils.yaml'}]\nevaluation:\n  features: context\n")
    recipe = load_recipe(recipe_file)
    assert validate(recipe, registry) == [
        f"{recipe_file}:3: key evaluation.features: 'context' probes the predictor's aggregated context c_t (DPC, MemDPC), "
        f"and predictor 'transformer' (set by {recipe.where('model.predictor')}) offers none "
        "(vlmask.kinds.ContextFeatures); registered predictors that offer it: future"]
    assert recipe.where("model.predictor").endswith("fils.yaml:10")
    no_predictor = validate(load_recipe(RECIPES / "coclr" / "infonce.yaml", ["evaluation.features=context"]), registry)
    assert len(no_predictor) == 1 and "this recipe has no predictor (model.predictor)" in no_predictor[0]
    assert validate(load_recipe(RECIPES / "mae.yaml", ["evaluation.features=pooled"]), registry) == [
        "command line: evaluation.features=pooled: key evaluation.features: 'pooled' is not one of encoder, context"]
    for name in ("dpc_faithful.yaml", "memdpc.yaml"):
        assert validate(load_recipe(RECIPES / name, ["evaluation.features=context"]), registry) == [], name
    assert validate(load_recipe(RECIPES / "fils.yaml", ["evaluation.features=encoder"]), registry) == []
