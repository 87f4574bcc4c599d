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
