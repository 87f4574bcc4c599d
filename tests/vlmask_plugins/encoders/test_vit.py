"""VideoViT: token order, encoding only the given tokens, positions, presets, checkpointing."""

import math

import pytest
import torch

from vlmask.registry import Registry
from vlmask.types import TokenGrid
from vlmask_plugins.encoders import register_plugins
from vlmask_plugins.encoders.vit import VideoViT, sinusoid_encoding_table, video_vit_base

SLOW_ENCODERS = {"video_vit_large"}


def registry() -> Registry:
    reg = Registry()
    register_plugins(reg.registrar("vlmask_plugins.encoders"))
    return reg


def small_encoder(**overrides: object) -> VideoViT:
    torch.manual_seed(0)
    args = dict(num_frames=4, img_size=32, patch=16, embed_dim=32, depth=2, num_heads=4)
    args.update(overrides)
    return VideoViT(**args).eval()  # type: ignore[arg-type]


def video(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_grid() -> None:
    encoder = small_encoder()
    assert encoder.grid == TokenGrid(t=2, h=2, w=2, tubelet=2, patch=16)
    assert encoder.embed_dim == 32
    assert encoder(video()).shape == (2, 8, 32)
    index = torch.tensor([[0, 5, 6], [1, 2, 7]])
    assert encoder(video(), index).shape == (2, 3, 32)


def test_index_none_equals_all_tokens_in_order() -> None:
    encoder = small_encoder()
    everything = torch.arange(8).expand(2, 8)
    torch.testing.assert_close(encoder(video()), encoder(video(), everything), atol=1e-6, rtol=0)


def test_output_depends_only_on_the_kept_tubelets() -> None:
    encoder = small_encoder()
    clip = video()
    index = torch.tensor([[0, 3, 5], [0, 3, 5]])
    reference = encoder(clip, index)
    # token 6 sits at t=1, y=1, x=0: frames 2-3, rows 16-31, columns 0-15 (TokenGrid order)
    dropped = clip.clone()
    dropped[:, :, 2:4, 16:32, 0:16] += 5.0
    torch.testing.assert_close(encoder(dropped, index), reference, atol=0, rtol=0)
    # token 5 sits at t=1, y=0, x=1: changing it must change the output
    kept = clip.clone()
    kept[:, :, 2:4, 0:16, 16:32] += 5.0
    assert not torch.allclose(encoder(kept, index), reference)


def test_single_token_sees_exactly_its_tubelet() -> None:
    encoder = small_encoder()
    clip = video()
    grid = encoder.grid
    t, y, x = 1, 0, 1
    token = t * grid.spatial + y * grid.w + x
    changed = clip.clone()
    changed[:, :, t * 2 : t * 2 + 2, y * 16 : y * 16 + 16, x * 16 : x * 16 + 16] -= 3.0
    for other in range(grid.num_tokens):
        index = torch.full((2, 1), other)
        same = torch.equal(encoder(clip, index), encoder(changed, index))
        assert same == (other != token), other


def videomae_sinusoid(position: int, j: int, dim: int) -> float:
    """VideoMAE's get_sinusoid_encoding_table, one entry, straight from its formula."""
    angle = position / math.pow(10000, 2 * (j // 2) / dim)
    return math.sin(angle) if j % 2 == 0 else math.cos(angle)


def test_sincos_table_matches_videomae_formula() -> None:
    dim, positions = 768, 1568
    table = sinusoid_encoding_table(positions, dim)
    assert table.shape == (positions, dim) and table.dtype == torch.float32
    for position, j in [(0, 0), (0, 1), (1, 0), (1, 1), (7, 100), (7, 101), (1567, 766), (1567, 767), (400, 3)]:
        assert table[position, j].item() == pytest.approx(videomae_sinusoid(position, j, dim), abs=1e-6)
    encoder = small_encoder()
    torch.testing.assert_close(encoder.pos_embed[0], sinusoid_encoding_table(8, 32))
    assert "pos_embed" not in encoder.state_dict()  # fixed table, rebuilt from the config


def test_learned_positions_are_parameters() -> None:
    encoder = small_encoder(pos_embed="learned")
    assert isinstance(encoder.pos_embed, torch.nn.Parameter) and encoder.pos_embed.shape == (1, 8, 32)
    assert "pos_embed" in encoder.state_dict()


def test_grad_checkpointing_gives_same_output_and_grads() -> None:
    clip, index = video(), torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    results = []
    for checkpointing in (False, True):
        encoder = small_encoder(drop_path=0.2, grad_checkpointing=checkpointing).train()
        torch.manual_seed(1)  # same drop-path draws in both runs (checkpoint replays the RNG)
        out = encoder(clip, index)
        (out.square().mean()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 40}, "img_size"),
        ({"num_frames": 3}, "num_frames"),
        ({"num_heads": 5}, "num_heads"),
        ({"pos_embed": "rope"}, "pos_embed"),
        ({"drop_path": 1.5}, "drop_path"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_arguments_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_encoder(**overrides)


def test_wrong_video_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"video must have shape \(B, 3, 4, 32, 32\)"):
        small_encoder()(torch.randn(1, 3, 8, 32, 32))


def encoder_names() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW_ENCODERS else name
        for name in registry().names("encoder")
    ]


@pytest.mark.parametrize("name", encoder_names())
def test_every_registered_encoder_builds_small_and_encodes(name: str) -> None:
    entry = registry().get("encoder", name)
    for parameter in entry.signature.parameters.values():
        assert parameter.annotation is not parameter.empty, f"{name}.{parameter.name} has no type"
        assert parameter.default is not parameter.empty, f"{name}.{parameter.name} has no default"
    torch.manual_seed(0)
    encoder = entry.factory(num_frames=4, img_size=32, patch=16)
    assert encoder.grid == TokenGrid(2, 2, 2, 2, 16)
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 4, 32, 32), torch.tensor([[1, 6]]))
    assert out.shape == (1, 2, encoder.embed_dim)
    assert torch.isfinite(out).all()


def test_presets_fix_width_depth_heads() -> None:
    with torch.device("meta"):
        sizes = {
            name: (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
            for name in ("video_vit_tiny", "video_vit_small", "video_vit_base", "video_vit_large")
            for model in [registry().get("encoder", name).factory()]
        }
    assert sizes == {
        "video_vit_tiny": (192, 12, 3),
        "video_vit_small": (384, 12, 6),
        "video_vit_base": (768, 12, 12),
        "video_vit_large": (1024, 24, 16),
    }


def test_video_vit_base_has_videomae_vit_b_parameter_count() -> None:
    with torch.device("meta"):  # count without allocating or initialising 86M weights
        encoder = video_vit_base()
    assert encoder.grid.num_tokens == 1568
    count = sum(p.numel() for p in encoder.parameters())
    assert abs(count - 86.2e6) / 86.2e6 < 0.01, count
