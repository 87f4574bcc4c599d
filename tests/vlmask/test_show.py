"""``vlmask show``: pictures of real tiny runs trained here, on real synthetic clips.

The picture kinds that need plugin knowledge (masks, reconstruction, attention) are tested in
tests/vlmask_plugins/pictures; this file tests vlmask's own kinds (similarity, curves), the
command (errors on one line, nothing written), the animation files and the hook.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import av
import numpy as np
import pytest
import torch
import yaml

from vlmask import hookimpl
from vlmask.cli import main
from vlmask.config import load_recipe
from vlmask.engine import train_recipe
from vlmask.step import TrainStep
from vlmask.flops import record_train_flops
from vlmask.pictures import Column, Panel, grid_figure, token_map
from vlmask.plugins import default_plugins, load_plugins
from vlmask.show import (
    ShowError,
    comparison_attention,
    curve_keys,
    mask_generator,
    picture_kinds,
    read_curves,
    show,
    shown_clips,
    similarity,
)

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An isolated ``VLMASK_CACHE`` (caption embeddings) and one torch thread (tiny products
    stall when two threads compete for two busy cores) for the whole module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMASK_CACHE", str(tmp_path_factory.mktemp("show-cache")))
        yield
    torch.set_num_threads(threads)


def train_tiny(recipe: str, tiny_synth, tiny_scale, run_dir: Path, steps: int = 3) -> Path:
    train, val = tiny_synth
    overrides = [*tiny_scale, f"data.train={train}", f"data.val={val}", f"train.max_steps={steps}",
                 "train.log_every=1", f"run.dir={run_dir}"]
    recipe = load_recipe(RECIPES / recipe, overrides)
    summary, train_step = train_recipe(recipe)
    record_train_flops(run_dir, train_step, summary)  # as `vlmask run` does
    return run_dir


@pytest.fixture(scope="module")
def fils_run(tiny_synth, tiny_scale, module_cache, tmp_path_factory) -> Path:
    return train_tiny("fils.yaml", tiny_synth, tiny_scale, tmp_path_factory.mktemp("runs") / "fils")


@pytest.fixture(scope="module")
def mae_run(tiny_synth, tiny_scale, module_cache, tmp_path_factory) -> Path:
    return train_tiny("mae.yaml", tiny_synth, tiny_scale, tmp_path_factory.mktemp("runs") / "mae")


def shown(run_dir: Path, clips: tuple[int, ...] = (0, 1), text: str | None = None):
    return shown_clips(run_dir, run_dir.name, clips, None, text, None, (), default_plugins(), [])


# --------------------------------------------------------------------------- masks are seeded as the engine seeds them


@pytest.mark.parametrize("seed, step, rank", [(0, 0, 0), (3, 7, 1)])
def test_mask_generator_draws_what_the_engines_does(seed: int, step: int, rank: int) -> None:
    step_like = SimpleNamespace(seed=seed, rank=rank, mask_device=torch.device("cpu"))
    engine = TrainStep.mask_generator(step_like, step)  # what the train step gives its masker, on its own state
    ours = mask_generator(seed, step, rank, "cpu")
    assert torch.equal(torch.rand(64, generator=engine), torch.rand(64, generator=ours))


# --------------------------------------------------------------------------- similarity (FILS Figure 4)


def test_similarity_is_the_cosine_between_projected_tokens_and_the_text(fils_run: Path) -> None:
    clips = shown(fils_run)
    run, grid = clips.run, clips.grid
    text = run.text_encoder.encode(["a red cross turns"])[0]
    direction = torch.randn(run.encoder.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # rank one: every token maps onto +-text, so its cosine is the sign of direction . feature
        run.student.projection.weight.copy_(torch.outer(text, direction))
        features = run.encoder(clips.batch.video, None)
    clips.texts = ("a red cross turns",) * 2
    pictures = similarity(clips)
    expected = torch.sign(features @ direction)
    for row, panels in enumerate(pictures):
        (panel,) = panels
        slots = [f // grid.tubelet for f in range(clips.frames.shape[1])]
        np.testing.assert_allclose(panel.values, token_map(expected[row], grid)[slots], atol=1e-5)
        assert panel.images.shape == clips.frames[row].shape
        assert not np.array_equal(panel.images, clips.frames[row])  # the heat map is blended in


def test_similarity_names_the_recipe_without_a_text_space(mae_run: Path) -> None:
    with pytest.raises(ShowError, match=r"similarity: mae: recipe .*mae.yaml has no text space"):
        similarity(shown(mae_run))


def test_similarity_uses_text_caption_or_label(fils_run: Path) -> None:
    assert shown(fils_run, (0,), text="open drawer").texts == ("open drawer",)
    val = Path(load_recipe(fils_run / "config.yaml").get("data.val"))
    first = json.loads(val.read_text().splitlines()[0])
    assert shown(fils_run, (0,)).texts == (first["caption"],)


# --------------------------------------------------------------------------- curves


def test_curves_draw_every_logged_value_and_the_flops_axis(fils_run: Path, tmp_path: Path) -> None:
    curves = read_curves(fils_run, "fils")
    assert set(curves.terms) == {"fp", "actclip"}
    assert [r["step"] for r in curves.rows] == [1, 2, 3]
    summary = json.loads((fils_run / "summary.json").read_text())
    assert curves.flops_per_step == pytest.approx(summary["train_flops"] / 3)
    keys = curve_keys([curves])
    assert {"lr", "rankme", "grad_norm", "actclip/logit_scale"} <= set(keys)
    assert not {"step", "loss", "fp", "actclip"} & set(keys)
    path, notes = show("curves", [fils_run], tmp_path / "curves.png")
    assert path.stat().st_size > 10_000 and notes == []


def test_curves_of_a_run_without_summary_or_metrics(fils_run: Path, tmp_path: Path) -> None:
    older = tmp_path / "older"
    shutil.copytree(fils_run, older)
    (older / "summary.json").unlink()  # unfinished, or an older vlmask without train_flops
    path, notes = show("curves", [older], tmp_path / "curves.png")
    assert path.is_file() and notes == [f"{older}: no train_flops in summary.json; its curves are against step only"]
    (older / "metrics.jsonl").unlink()
    with pytest.raises(ShowError, match="no metrics.jsonl"):
        show("curves", [older], tmp_path / "again.png")
    assert not (tmp_path / "again.png").exists()


# --------------------------------------------------------------------------- files and layout


def test_an_animation_has_one_frame_per_clip_frame(fils_run: Path, tmp_path: Path) -> None:
    for suffix in (".gif", ".mp4"):
        path, _ = show("similarity", [fils_run], tmp_path / f"similarity{suffix}", clips=[2], progress=False)
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 4  # tiny scale: 4 frames per clip
        assert not np.array_equal(frames[0], frames[-1])


def test_runs_stand_side_by_side_under_their_names(fils_run: Path, mae_run: Path, tmp_path: Path) -> None:
    panel = Panel("p", np.zeros((2, 8, 8, 3), np.uint8), ("frame 0", "frame 1"))
    figure = grid_figure([Column("fils", [[panel]]), Column("mae", [[panel, panel]])], ["clip 0"])
    assert [block._suptitle.get_text() for block in figure.subfigs] == ["fils", "mae"]
    path, _ = show("similarity", [fils_run, fils_run], tmp_path / "two.png", clips=[0, 1], progress=False)
    one, _ = show("similarity", [fils_run], tmp_path / "one.png", clips=[0, 1], progress=False)
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[1] > 1.8 * matplotlib.image.imread(one).shape[1]


# --------------------------------------------------------------------------- the command: one line, nothing written


def command(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["show", *args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def test_show_writes_a_png(fils_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks.png"
    assert main(["show", "masks", str(fils_run), "--clip", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("make, expected", [
    (lambda run, tmp: ["masks", str(run), "--clip", "6"],
     r"^show: clip 6 is out of range: .*val.jsonl has 6 clips \(0-5\)$"),
    (lambda run, tmp: ["bogus", str(run)], r"^show: unknown picture 'bogus'; known: attention, curves, masks, "
                                          r"reconstruction, similarity$"),
    (lambda run, tmp: ["masks", str(tmp)], r"^show: .*: not a run directory \(no config.yaml\)$"),
    (lambda run, tmp: ["attention", str(run), "--layer", "1"], r"^show: attention: --layer 1 is out of range"),
    (lambda run, tmp: ["reconstruction", str(run)], r"^show: reconstruction: fils: recipe .*fils.yaml has no pixel "
                                                    r"target \(normalized_pixels\)"),
    (lambda run, tmp: ["curves", str(run), "--out", str(tmp / "c.gif")], r"^show: curves: .*c.gif: curves are a still"),
])
def test_refusals_are_one_line_and_write_nothing(fils_run: Path, tmp_path: Path, capsys, make, expected) -> None:
    args = make(fils_run, tmp_path)
    out = next((a for a in args if a.endswith(".gif")), str(tmp_path / "x.png"))
    code, lines = command(capsys, *args, *([] if "--out" in args else ["--out", out]))
    assert code == 1 and len(lines) == 1, lines
    assert re.search(expected, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unreadable_video_is_named(fils_run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 50)
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"video": "broken.mp4", "caption": "nothing"}) + "\n")
    out = tmp_path / "pictures" / "x.png"
    out.parent.mkdir()
    code, lines = command(capsys, "masks", str(fils_run), "--manifest", str(manifest), "--out", str(out))
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"show: {manifest}: ") and "broken.mp4" in lines[0]
    assert list(out.parent.iterdir()) == []


def test_a_run_of_an_older_vlmask_is_shown(fils_run: Path, tmp_path: Path) -> None:
    older = tmp_path / "older"
    shutil.copytree(fils_run, older)
    config = yaml.safe_load((older / "config.yaml").read_text())
    config.pop("record")  # no record of the device, the manifest or the versions
    (older / "config.yaml").write_text(yaml.safe_dump(config))
    (older / "summary.json").unlink()
    path, notes = show("masks", [older], tmp_path / "masks.png", progress=False)
    assert path.is_file() and notes == []


# --------------------------------------------------------------------------- the hook


class Blank:
    """A third-party picture kind: each clip's first frame, blank."""

    @staticmethod
    def blank(clips) -> list[list[Panel]]:
        """each clip's first frame, white."""
        return [[Panel("blank", np.full_like(clips.frames[i][:1], 255), ("frame 0",))] for i in range(clips.batch.size)]

    @hookimpl
    def vlmask_picture_kinds(self):
        return {"blank": self.blank}


class Clash:
    @hookimpl
    def vlmask_picture_kinds(self):
        return {"similarity": Blank.blank}


def test_a_plugin_adds_a_picture_kind_and_may_not_take_a_name(fils_run: Path, tmp_path: Path) -> None:
    plugins = load_plugins(extra=[("blank", Blank())])
    assert picture_kinds(plugins)["blank"][1] == "blank"
    assert {"masks", "attention", "reconstruction", "similarity"} <= set(picture_kinds(plugins))
    path, _ = show("blank", [fils_run], tmp_path / "blank.png", plugins=plugins, progress=False)
    assert path.is_file()
    with pytest.raises(ShowError, match="picture kind 'similarity' is given by both vlmask and clash"):
        picture_kinds(load_plugins(extra=[("clash", Clash())]))


def test_a_comparison_gets_the_attention_of_each_recipe(fils_run: Path, mae_run: Path, tmp_path: Path) -> None:
    runs = [{"name": "fils", "seed": 0, "run_dir": str(fils_run)}, {"name": "fils", "seed": 1, "run_dir": "elsewhere"},
            {"name": "mae", "seed": 0, "run_dir": str(mae_run)}]
    (tmp_path / "comparison.json").write_text(json.dumps({"runs": runs}))
    path, why_not = comparison_attention(tmp_path)
    assert path == tmp_path / "attention.png" and path.is_file() and why_not is None
    (tmp_path / "comparison.json").write_text(json.dumps({"runs": [{"name": "x", "seed": 0, "run_dir": "nowhere"}]}))
    (tmp_path / "attention.png").unlink()
    path, why_not = comparison_attention(tmp_path)
    assert path is None and why_not == "no attention.png: nowhere: not a run directory (no config.yaml)"
