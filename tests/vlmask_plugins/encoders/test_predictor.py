"""TransformerPredictor: widths, row order, positions, checkpointing."""

import pytest
import torch

from vlmask.types import Mask, TokenGrid
from vlmask_plugins.encoders.predictor import TransformerPredictor

GRID = TokenGrid(t=2, h=2, w=3, tubelet=2, patch=16)  # 12 tokens


def predictor(**overrides: object) -> TransformerPredictor:
    torch.manual_seed(0)
    args = dict(encoder_dim=24, grid=GRID, dim=32, depth=2, num_heads=4)
    args.update(overrides)
    return TransformerPredictor(**args).eval()  # type: ignore[arg-type]


def inputs() -> tuple[torch.Tensor, Mask]:
    visible = torch.tensor([[0, 4, 7, 9], [1, 2, 3, 11]])
    predict = torch.tensor([[1, 2, 5], [0, 6, 10]])
    features = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(0))
    return features, Mask(visible, predict)


@pytest.mark.parametrize(("output", "width"), [("features", 24), ("pixels", 3 * 2 * 16 * 16), (10, 10)])
def test_output_width(output: str | int, width: int) -> None:
    features, mask = inputs()
    assert predictor(output=output)(features, mask).shape == (2, 3, width)


def test_permuting_predict_indices_permutes_rows() -> None:
    model = predictor()
    features, mask = inputs()
    reference = model(features, mask)
    order = torch.tensor([2, 0, 1])
    permuted = model(features, Mask(mask.visible, mask.predict[:, order]))
    torch.testing.assert_close(permuted, reference[:, order], atol=1e-5, rtol=1e-5)


def test_visible_tokens_are_a_set_and_positions_matter() -> None:
    model = predictor()
    features, mask = inputs()
    reference = model(features, mask)
    order = torch.tensor([3, 1, 0, 2])
    shuffled = model(features[:, order], Mask(mask.visible[:, order], mask.predict))
    torch.testing.assert_close(shuffled, reference, atol=1e-5, rtol=1e-5)
    moved = model(features, Mask(mask.visible, torch.tensor([[1, 2, 8], [0, 6, 10]])))
    assert not torch.allclose(moved[0, 2], reference[0, 2])  # same mask token, other position
    torch.testing.assert_close(moved[1], reference[1], atol=1e-5, rtol=1e-5)


def test_mask_token_is_learned_and_receives_gradient() -> None:
    model = predictor().train()
    features, mask = inputs()
    model(features, mask).square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert 0.0 < model.mask_token.detach().std().item() < 0.05


def test_grad_checkpointing_gives_same_output_and_grads() -> None:
    features, mask = inputs()
    runs = []
    for checkpointing in (False, True):
        model = predictor(grad_checkpointing=checkpointing).train()
        out = model(features, mask)
        out.sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-6, rtol=0)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(grad, runs[1][1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"output": "logits"}, "output"), ({"output": 0}, "output"), ({"num_heads": 5}, "num_heads"),
     ({"attention": "flash"}, "attention"), ({"depth": 0}, "depth")],
)  # fmt: skip
def test_bad_arguments_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predictor(**overrides)


def test_wrong_feature_width_is_a_clear_error() -> None:
    features, mask = inputs()
    with pytest.raises(ValueError, match="encoder_dim is 24"):
        predictor()(features[..., :16], mask)


def test_attention_backend_settable_like_the_encoder() -> None:
    model = predictor()
    assert model.attention_backend == "sdpa"
    assert model.set_attention_backend("auto", "cpu")[0] == "sdpa"
