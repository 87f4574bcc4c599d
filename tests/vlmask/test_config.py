from pathlib import Path

import pytest

from vlmask.config import RecipeError, load_recipe, parse_override


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bases_merge_left_to_right_then_file_then_command_line(tmp_path):
    write(tmp_path / "a.yaml", "x: 1\ny: 1\nm:\n  name: tube\n  ratio: 0.9\n")
    write(tmp_path / "b.yaml", "y: 2\nz: 2\n")
    r = write(tmp_path / "r.yaml", "base: [a.yaml, b.yaml]\nz: 3\nm:\n  ratio: 0.8\nw: ${m.ratio}\n")
    recipe = load_recipe(r, ["m.ratio=0.7", "~x", "new.k=[1, 2]"])
    assert recipe.get("y") == 2 and recipe.get("z") == 3 and recipe.get("m") == {"name": "tube", "ratio": 0.7}
    assert recipe.get("w") == 0.7, "interpolation resolves after overrides"
    assert "x" not in recipe.config and recipe.get("new.k") == [1, 2]


def test_provenance_names_file_line_and_command_line(tmp_path):
    write(tmp_path / "a.yaml", "m:\n  name: tube\n  ratio: 0.9\n")
    r = write(tmp_path / "r.yaml", "base: [a.yaml]\nseed: 1\n")
    recipe = load_recipe(r, ["m.ratio=0.5"])
    assert recipe.where("m.name").endswith("a.yaml:2")
    assert recipe.where("seed").endswith("r.yaml:2")
    assert recipe.where("m.ratio") == "command line: m.ratio=0.5"


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=3") == ("a.b", 3, False)
    assert parse_override("a=0.5") == ("a", 0.5, False)
    assert parse_override("a=null") == ("a", None, False)
    assert parse_override("a=hello") == ("a", "hello", False)
    assert parse_override("~a.b") == ("a.b", None, True)
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("novalue")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    r = write(tmp_path / "r.yaml", "base: [nope.yaml]\n")
    with pytest.raises(RecipeError, match=r"nope.yaml: recipe file not found \(named in .*r.yaml"):
        load_recipe(r)
    cyc = write(tmp_path / "c.yaml", "base: [c.yaml]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(cyc)
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    r2 = write(tmp_path / "r2.yaml", "a: 1\n")
    with pytest.raises(RecipeError, match="not in the recipe"):
        load_recipe(r2, ["~b"])


def test_bad_interpolation_names_key(tmp_path):
    r = write(tmp_path / "r.yaml", "a: 1\nb: ${nothere}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:2: key b: cannot resolve"):
        load_recipe(r)


def test_naming_another_plugin_replaces_the_inherited_node(tmp_path):
    write(tmp_path / "a.yaml", "masker: {name: tube, ratio: 0.9}\nhead: {name: x, t: 1}\n")
    r = write(tmp_path / "r.yaml", "base: [a.yaml]\nmasker: {name: grid, stride: 2}\nhead: {t: 2}\n")
    recipe = load_recipe(r)
    assert recipe.get("masker") == {"name": "grid", "stride": 2}
    assert recipe.get("head") == {"name": "x", "t": 2}, "same plugin: arguments merge"
    assert recipe.where("masker.ratio").endswith("r.yaml:2")


# ------------------------------------------------------------------ issue 22.5: interpolations that point at each other

RECIPES = Path(__file__).parents[2] / "recipes"

LOOPS = [
    # (the recipe's own lines after ``base:``, overrides, the loop as printed, the keys with their lines)
    ("a:\n  b: ${a.c}\n  c: ${a.b}\n", [], "a.b -> a.c -> a.b", ["a.b at {f}:3", "a.c at {f}:4"]),
    ("a:\n  b: ${a.c}\n  c: ${a.d}\n  d: clip-${a.e}\n  e: ${a.b}\n", [], "a.b -> a.c -> a.d -> a.e -> a.b",
     ["a.b at {f}:3", "a.c at {f}:4", "a.d at {f}:5", "a.e at {f}:6"]),
    ("a:\n  b: ${a.c}\n  c: 1\n", ["a.c=${.b}"], "a.b -> a.c -> a.b", ["a.b at {f}:3", "a.c at command line: a.c=${.b}"]),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("body, overrides, loop, sources", LOOPS, ids=["two", "four-through-text", "relative-override"])
def test_an_interpolation_loop_is_one_line_naming_file_and_keys(body, overrides, loop, sources, command, tmp_path,
                                                                capsys, monkeypatch):
    """A recursed through ``Recipe.where`` into a RecursionError (a traceback-less but meaningless
    line), or printed OmegaConf's three-line message: one line, the file and every key of the loop."""
    from vlmask.cli import main

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "loop.yaml", f"base: [{RECIPES / 'mae.yaml'}]\n{body}")
    assert main([command, "loop.yaml", *overrides, f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("- ")]
    assert len(problems) == 1 and "Recursion" not in err and "Traceback" not in err and "full_key" not in err, err
    assert problems[0].startswith(f"- loop.yaml:3: key a.b: its ${{...}} interpolations form a loop, {loop} ("), err
    for source in sources:
        assert source.replace("{f}", "loop.yaml") in problems[0], err
    assert not (tmp_path / "run").exists()


def test_where_follows_copies_that_point_at_each_other_without_recursing(tmp_path):
    from omegaconf import OmegaConf

    from vlmask.config import Recipe

    recipe = Recipe(tmp_path / "r.yaml", OmegaConf.create({}), provenance={"a.b": "r.yaml:2", "a.c": "r.yaml:3"},
                    interpolations={"a.b": "a.c", "a.c": "a.b"})
    assert recipe.where("a.b") == "r.yaml:3 (through ${a.c} at r.yaml:2)"
