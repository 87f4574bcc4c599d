"""Maskers against the reference semantics (VideoMAE tube, MAE random, MoFo action area,
Turbo partial, DPC future blocks)."""

from __future__ import annotations

import pytest
import torch

from vlmask.types import Batch, Mask, TokenGrid
from vlmask_plugins.maskers import (
    ActionAreaMasker,
    FutureBlocksMasker,
    PartialMasker,
    RandomMasker,
    TubeMasker,
    register_plugins,
)
from vlmask_plugins.maskers.geometry import token_centres_inside_box, tubes_from_spatial

PAPER_GRID = TokenGrid.for_clip(16, 224, 224)  # 8 x 14 x 14


def make_batch(size: int, grid: TokenGrid, action_box: torch.Tensor | None = None) -> Batch:
    # Tiny pixel tensor: maskers read only the batch size and device.
    return Batch(video=torch.zeros(size, 3, 1, 1, 1), action_box=action_box)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_well_formed(mask: Mask, grid: TokenGrid, batch_size: int) -> None:
    assert mask.visible.dtype == torch.long and mask.predict.dtype == torch.long
    assert mask.visible.shape[0] == batch_size and mask.predict.shape[0] == batch_size
    for row in (*mask.visible, *mask.predict):
        assert torch.equal(row, row.sort().values), "rows must be sorted ascending"
        assert row.unique().numel() == row.numel()
        assert int(row.min()) >= 0 and int(row.max()) < grid.num_tokens
    for visible, predict in zip(mask.visible, mask.predict):
        assert not set(visible.tolist()) & set(predict.tolist()), "a token is both visible and predicted"


def spatial_sets(tokens: torch.Tensor, grid: TokenGrid) -> list[set[int]]:
    """Per temporal slot, the spatial positions present among the tokens of one clip."""
    return [set((tokens[(tokens // grid.spatial) == slot] % grid.spatial).tolist()) for slot in range(grid.t)]


def test_register_plugins_registers_every_masker() -> None:
    seen: list[tuple[str, str]] = []
    register_plugins(lambda kind, name, factory: seen.append((kind, name)))
    assert sorted(seen) == sorted(
        [("masker", n) for n in ("tube", "random", "action_area", "partial", "future_blocks")]
    )


# ---- tube ----------------------------------------------------------------------------------


def test_paper_grid_has_1568_tokens() -> None:
    assert (PAPER_GRID.t, PAPER_GRID.h, PAPER_GRID.w, PAPER_GRID.num_tokens) == (8, 14, 14, 1568)


def test_tube_ratio_09_on_paper_grid_keeps_160_tokens_videomae_rounding() -> None:
    mask = TubeMasker(0.9)(make_batch(3, PAPER_GRID), PAPER_GRID, seeded(0))
    check_well_formed(mask, PAPER_GRID, 3)
    assert mask.num_visible == 160  # 20 per slot; V-JEPA's rounding would give 19 * 8 = 152
    assert mask.num_predict == 1408  # 176 per slot
    assert mask.num_visible + mask.num_predict == PAPER_GRID.num_tokens


def test_tube_mask_is_the_same_spatial_mask_in_every_slot() -> None:
    mask = TubeMasker(0.75)(make_batch(4, PAPER_GRID), PAPER_GRID, seeded(1))
    for clip in range(4):
        per_slot = spatial_sets(mask.visible[clip], PAPER_GRID)
        assert all(s == per_slot[0] for s in per_slot) and len(per_slot[0]) == 196 - 147


def test_tube_masks_differ_between_clips_and_follow_the_generator() -> None:
    grid = TokenGrid(2, 6, 6)
    first = TubeMasker(0.5)(make_batch(8, grid), grid, seeded(3))
    again = TubeMasker(0.5)(make_batch(8, grid), grid, seeded(3))
    assert torch.equal(first.visible, again.visible) and torch.equal(first.predict, again.predict)
    assert len({tuple(r.tolist()) for r in first.visible}) > 1


def test_tube_rejects_bad_ratio_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="ratio must be in"):
        TubeMasker(1.5)
    with pytest.raises(ValueError, match="ratio"):
        TubeMasker(0.01)(make_batch(1, TokenGrid(1, 2, 2)), TokenGrid(1, 2, 2))  # masks nothing


# ---- random ----------------------------------------------------------------------------------


def test_random_masks_floor_of_ratio_times_all_tokens_not_per_slot() -> None:
    mask = RandomMasker(0.9)(make_batch(4, PAPER_GRID), PAPER_GRID, seeded(0))
    check_well_formed(mask, PAPER_GRID, 4)
    assert mask.num_predict == int(0.9 * 1568) == 1411  # tube would be 1408
    assert mask.num_visible == 157
    per_slot = spatial_sets(mask.visible[0], PAPER_GRID)
    assert any(s != per_slot[0] for s in per_slot), "random masking must not be tube-shaped"


# ---- action area ------------------------------------------------------------------------------


def test_token_centres_inside_box_uses_patch_centres_edges_inclusive() -> None:
    grid = TokenGrid(1, 4, 4)  # centres at 0.125, 0.375, 0.625, 0.875
    boxes = torch.tensor([[0.125, 0.0, 0.375, 0.3], [0.2, 0.2, 0.3, 0.3], [0.6, 0.6, 0.0, 0.0]])
    inside = token_centres_inside_box(grid, boxes, "cpu").view(3, 4, 4)
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[0, 0:2] = True  # row 0 (cy 0.125), columns with cx 0.125 and 0.375 (both on edges)
    assert torch.equal(inside[0], expected0)
    assert not inside[1].any()  # box overlaps patches but holds no centre
    expected2 = torch.zeros(4, 4, dtype=torch.bool)
    expected2[0:2, 0:2] = True  # swapped corners are read as the same box
    assert torch.equal(inside[2], expected2)


def test_action_area_takes_three_quarters_of_the_masked_positions_inside() -> None:
    grid = TokenGrid(2, 14, 14)
    box = torch.tensor([[0.0, 0.0, 0.83, 0.83]] * 3)  # centres (i + 0.5) / 14 <= 0.83 for i <= 11
    inside = token_centres_inside_box(grid, box, "cpu")
    assert inside.sum(dim=1).tolist() == [144] * 3  # 52 outside: both sides can supply their share
    masker = ActionAreaMasker(ratio=0.9, inside_fraction=0.75)
    mask = masker(make_batch(3, grid, box), grid, seeded(0))
    check_well_formed(mask, grid, 3)
    count = int(0.9 * 196)  # 176
    expected_inside = round(0.75 * count)  # 132
    for clip in range(3):
        per_slot = spatial_sets(mask.predict[clip], grid)
        assert per_slot[0] == per_slot[1] and len(per_slot[0]) == count  # tubes, VideoMAE floor
        masked_inside = sum(bool(inside[clip, p]) for p in per_slot[0])
        assert masked_inside == expected_inside
        assert len(per_slot[0]) - masked_inside == count - expected_inside


def test_action_area_small_box_masks_all_of_it_and_the_rest_outside() -> None:
    grid = TokenGrid(1, 10, 10)
    box = torch.tensor([[0.0, 0.0, 0.2, 0.2]])  # 2 x 2 = 4 positions inside
    mask = ActionAreaMasker(ratio=0.5, inside_fraction=0.75)(make_batch(1, grid, box), grid, seeded(0))
    inside = set(torch.nonzero(token_centres_inside_box(grid, box, "cpu")[0]).flatten().tolist())
    assert inside == {0, 1, 10, 11}
    predicted = set(mask.predict[0].tolist())
    assert inside <= predicted and len(predicted) == 50  # all 4 inside + 46 from outside


def test_action_area_big_box_takes_the_remainder_from_inside_when_outside_is_short() -> None:
    grid = TokenGrid(1, 10, 10)
    box = torch.tensor([[0.0, 0.0, 1.0, 0.8]])  # centres of rows 0..7 (<= 0.75) inside: 80; 20 outside
    mask = ActionAreaMasker(ratio=0.9, inside_fraction=0.5)(make_batch(1, grid, box), grid, seeded(0))
    predicted = set(mask.predict[0].tolist())
    outside = {p for p in range(100) if p >= 80}
    assert len(predicted) == 90 and outside <= predicted  # 45 wanted outside, only 20 exist


def test_action_area_per_clip_boxes_and_all_inside_or_all_outside_fractions() -> None:
    grid = TokenGrid(1, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])  # left half, right half
    inside = token_centres_inside_box(grid, boxes, "cpu")
    only_inside = ActionAreaMasker(ratio=0.5, inside_fraction=1.0)(make_batch(2, grid, boxes), grid, seeded(0))
    only_outside = ActionAreaMasker(ratio=0.5, inside_fraction=0.0)(make_batch(2, grid, boxes), grid, seeded(0))
    for clip in range(2):
        assert bool(inside[clip, only_inside.predict[clip]].all())
        assert not bool(inside[clip, only_outside.predict[clip]].any())


def test_action_area_without_box_is_a_clear_error() -> None:
    grid = TokenGrid(1, 4, 4)
    with pytest.raises(ValueError, match="action_box"):
        ActionAreaMasker()(make_batch(1, grid), grid)
    with pytest.raises(ValueError, match="inside_fraction"):
        ActionAreaMasker(inside_fraction=1.2)


# ---- partial ----------------------------------------------------------------------------------


def test_partial_predicts_a_tube_subset_of_the_dropped_tokens() -> None:
    mask = PartialMasker(drop_ratio=0.9, reconstruct_ratio=0.5)(make_batch(3, PAPER_GRID), PAPER_GRID, seeded(0))
    check_well_formed(mask, PAPER_GRID, 3)
    assert mask.num_visible == 160  # encoder cost ~ N(1 - m)
    assert mask.num_predict == 8 * int(0.5 * 196)  # 784; decoder sees 160 + 784 ~ N(1 - m + r)
    tube = TubeMasker(0.9)(make_batch(3, PAPER_GRID), PAPER_GRID, seeded(0))
    assert torch.equal(mask.visible, tube.visible)
    for clip in range(3):
        assert set(mask.predict[clip].tolist()) < set(tube.predict[clip].tolist())
        per_slot = spatial_sets(mask.predict[clip], PAPER_GRID)
        assert all(s == per_slot[0] for s in per_slot)


def test_partial_with_equal_ratios_is_plain_tube_masking() -> None:
    grid = TokenGrid(4, 7, 7)
    partial = PartialMasker(drop_ratio=0.75, reconstruct_ratio=0.75)(make_batch(5, grid), grid, seeded(9))
    tube = TubeMasker(0.75)(make_batch(5, grid), grid, seeded(9))
    assert torch.equal(partial.visible, tube.visible) and torch.equal(partial.predict, tube.predict)


def test_partial_rejects_reconstructing_more_than_dropped() -> None:
    with pytest.raises(ValueError, match="reconstruct_ratio must be <= drop_ratio"):
        PartialMasker(drop_ratio=0.5, reconstruct_ratio=0.6)


# ---- future blocks -------------------------------------------------------------------------------


def test_future_blocks_hide_the_last_slots() -> None:
    grid = TokenGrid(4, 3, 3)
    mask = FutureBlocksMasker(num_future_slots=1)(make_batch(2, grid), grid)
    check_well_formed(mask, grid, 2)
    assert mask.visible.tolist() == [list(range(27))] * 2
    assert mask.predict.tolist() == [list(range(27, 36))] * 2
    default = FutureBlocksMasker()(make_batch(1, grid), grid)
    assert default.predict[0].tolist() == list(range(18, 36))  # default k = 2


def test_future_blocks_need_a_visible_slot() -> None:
    grid = TokenGrid(2, 3, 3)
    with pytest.raises(ValueError, match="num_future_slots"):
        FutureBlocksMasker(num_future_slots=2)(make_batch(1, grid), grid)
    with pytest.raises(ValueError, match="num_future_slots"):
        FutureBlocksMasker(num_future_slots=0)


def test_tubes_from_spatial_orders_tokens_t_h_w() -> None:
    grid = TokenGrid(3, 2, 2)
    assert tubes_from_spatial(torch.tensor([[1, 2]]), grid).tolist() == [[1, 2, 5, 6, 9, 10]]


@pytest.mark.parametrize(
    "masker",
    [TubeMasker(0.5), RandomMasker(0.5), ActionAreaMasker(0.5), PartialMasker(0.5, 0.25), FutureBlocksMasker(1)],
    ids=lambda m: type(m).__name__,
)
def test_every_masker_returns_indices_on_the_batch_device(masker: object) -> None:
    grid = TokenGrid(2, 4, 4)
    batch = make_batch(2, grid, torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2))
    mask = masker(batch, grid, seeded(0))  # type: ignore[operator]
    check_well_formed(mask, grid, 2)
    assert mask.visible.device == batch.video.device and mask.predict.device == batch.video.device


def test_action_area_rounds_half_of_the_inside_share_up() -> None:
    grid = TokenGrid(1, 4, 5)
    box = torch.tensor([[0.0, 0.0, 0.4, 1.0]])  # columns 0-1 of 5 (centres 0.1, 0.3): 8 positions inside
    inside = token_centres_inside_box(grid, box, "cpu")[0]
    assert int(inside.sum()) == 8
    mask = ActionAreaMasker(ratio=0.5, inside_fraction=0.25)(make_batch(1, grid, box), grid, seeded(0))
    assert mask.num_predict == 10  # 0.25 * 10 = 2.5 -> 3 inside (half up), 7 outside
    assert int(inside[mask.predict[0]].sum()) == 3


def test_split_by_flag_checks_the_counts_on_the_device():
    from vlmask_plugins.maskers.sampling import split_by_flag

    selected, rest = split_by_flag(torch.tensor([[True, False, True], [False, True, True]]), 2)
    assert selected.tolist() == [[0, 2], [1, 2]] and rest.tolist() == [[1], [0]]
    with pytest.raises(RuntimeError, match="expected 2 selected positions in every row"):
        split_by_flag(torch.tensor([[True, False, False], [False, True, True]]), 2)
