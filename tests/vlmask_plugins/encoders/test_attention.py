"""The attention switch: SDPA matches textbook attention, backend choice is explicit and safe."""

import math

import pytest
import torch

from vlmask_plugins.encoders.attention import (
    Attention,
    AttentionBackendError,
    resolve_attention_backend,
    sdpa_attention,
)
from vlmask_plugins.encoders.vit import VideoViT


def naive_attention(x: torch.Tensor, layer: Attention) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh)) V per head, written out, then the output projection."""
    batch, tokens, width = x.shape
    heads, head_dim = layer.num_heads, layer.head_dim
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).split(width, dim=-1)
    split = lambda t: t.reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(batch, tokens, width)
    return layer.proj(out)


def test_sdpa_attention_equals_naive_softmax_attention() -> None:
    torch.manual_seed(0)
    layer = Attention(48, num_heads=4, qkv_bias=True, backend="sdpa").eval()
    torch.nn.init.normal_(layer.qkv.bias)  # non-zero biases so the test sees them
    x = torch.randn(2, 7, 48)
    assert layer.backend == "sdpa"
    torch.testing.assert_close(layer(x), naive_attention(x, layer), atol=1e-5, rtol=1e-5)


def test_sdpa_attention_takes_batch_tokens_heads_layout() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))  # (B, N, H, Dh)
    out = sdpa_attention(q, k, v)
    head = 1  # one head by hand: tokens of that head only
    weights = torch.softmax(q[:, :, head] @ k[:, :, head].transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out[:, :, head], weights @ v[:, :, head], atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 5, 3, 8)


def test_auto_on_cpu_picks_sdpa_with_a_reason() -> None:
    backend, reason = resolve_attention_backend("auto", "cpu")
    assert backend == "sdpa"
    assert "cpu" in reason.lower()
    assert resolve_attention_backend("sdpa", "cpu")[0] == "sdpa"
    assert resolve_attention_backend("auto", None)[0] == "sdpa"


def test_xformers_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(AttentionBackendError, match="xformers.*cpu.*CPU kernels"):
        resolve_attention_backend("xformers", "cpu")


def test_unknown_attention_value_names_the_argument() -> None:
    with pytest.raises(ValueError, match="attention must be one of auto, xformers, sdpa"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="attention must be one of"):
        VideoViT(num_frames=2, img_size=16, depth=1, embed_dim=8, num_heads=2, attention="flash")


def test_encoder_backend_is_visible_and_settable_after_construction() -> None:
    encoder = VideoViT(num_frames=2, img_size=16, embed_dim=16, depth=2, num_heads=2)
    assert encoder.attention_backend == "sdpa"
    assert encoder.set_attention_backend("auto", torch.device("cpu"))[0] == "sdpa"
    assert encoder.set_attention_backend()[0] == "sdpa"  # recipe value, device of the parameters
    with pytest.raises(AttentionBackendError, match="CPU kernels"):
        encoder.set_attention_backend("xformers", "cpu")
    assert encoder.attention_backend == "sdpa"
    assert {block.attn.backend for block in encoder.blocks} == {"sdpa"}


def test_forcing_xformers_on_cpu_tensors_fails_clearly() -> None:
    layer = Attention(16, num_heads=2, backend="xformers")
    with pytest.raises(AttentionBackendError, match="needs CUDA tensors"):
        layer(torch.randn(1, 3, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_sdpa_on_gpu(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    backend, reason = resolve_attention_backend("auto", device)
    if backend != "xformers":
        pytest.skip(f"xformers not usable here: {reason}")
    torch.manual_seed(0)
    encoder = VideoViT(num_frames=4, img_size=64, embed_dim=128, depth=2, num_heads=4).to(device).eval()
    video = torch.randn(2, 3, 4, 64, 64, device=device)
    index = torch.stack([torch.randperm(32, device=device)[:12].sort().values for _ in range(2)])
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        assert encoder.set_attention_backend("sdpa", device)[0] == "sdpa"
        reference = encoder(video, index).float()
        assert encoder.set_attention_backend("xformers", device)[0] == "xformers"
        fast = encoder(video, index).float()
    tolerance = 2e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fast, reference, atol=tolerance, rtol=tolerance)
