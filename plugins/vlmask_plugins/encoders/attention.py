"""One attention switch: xformers ``memory_efficient_attention`` on CUDA, PyTorch SDPA elsewhere.

``resolve_attention_backend(requested, device)`` turns a recipe's ``attention`` value
("auto" | "xformers" | "sdpa") into the backend actually used and a one-line reason the engine
can report. ``"auto"`` picks xformers only on CUDA when ``import xformers.ops`` succeeds *and*
a tiny probe call on that device matches SDPA; anything else (no CUDA, import error, a build
for another torch, missing kernels) falls back to SDPA and says why. ``"xformers"`` where it
cannot run raises :class:`AttentionBackendError` with that reason.

The two kernels want different layouts: xformers takes (B, N, H, Dh), SDPA takes (B, H, N, Dh).
:class:`Attention` keeps q/k/v in (B, N, H, Dh) and transposes only for SDPA.
"""

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Values a recipe's ``attention`` argument may take.
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "xformers", "sdpa")
#: Backends an :class:`Attention` module can run.
BACKENDS: tuple[str, ...] = ("xformers", "sdpa")


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here (the message says why)."""


def check_attention_choice(attention: str, argument: str = "attention") -> None:
    """Raise a ValueError naming ``argument`` unless ``attention`` is a known choice."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{argument} must be one of {', '.join(ATTENTION_CHOICES)}; got {attention!r}")


@functools.cache
def _import_xformers_ops() -> tuple[Any | None, str]:
    """Import ``xformers.ops`` without ever raising; return (module or None, reason). Cached:
    the attention layers call it on every forward, and the import resets warning filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import xformers.ops as xops  # noqa: PLC0415 (optional dependency)
        except BaseException as error:  # a build for another torch may raise anything, even SystemExit
            if isinstance(error, KeyboardInterrupt):
                raise
            return None, f"import xformers.ops failed: {type(error).__name__}: {error}".strip()
    if not hasattr(xops, "memory_efficient_attention"):
        return None, "xformers.ops has no memory_efficient_attention"
    notes = "; ".join(str(w.message).splitlines()[0] for w in caught if str(w.message).strip())
    return xops, f"xformers.ops imported (warnings: {notes})" if notes else "xformers.ops imported"


@functools.lru_cache(maxsize=None)
def _probe_xformers(device_str: str) -> tuple[bool, str]:
    """Run a tiny xformers attention on ``device_str`` and compare it with SDPA (cached per device)."""
    xops, reason = _import_xformers_ops()
    if xops is None:
        return False, reason
    device = torch.device(device_str)
    dtypes = [torch.float32]
    try:
        if torch.cuda.is_bf16_supported():
            dtypes.append(torch.bfloat16)
    except Exception:  # noqa: BLE001 (a broken CUDA setup must not crash the probe)
        pass
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        for dtype in dtypes:
            q, k, v = (torch.randn(1, 8, 2, 16, generator=generator).to(device, dtype) for _ in range(3))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = xops.memory_efficient_attention(q, k, v)
            expected = sdpa_attention(q, k, v)
            tolerance = 1e-4 if dtype == torch.float32 else 3e-2
            if out.shape != expected.shape or not torch.allclose(out.float(), expected.float(), atol=tolerance):
                return False, f"xformers probe on {device_str} ({dtype}) disagrees with SDPA"
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return False, f"xformers probe on {device_str} failed: {type(error).__name__}: {first_line}"
    return True, f"{reason}; probe on {device_str} passed"


def resolve_attention_backend(requested: str, device: torch.device | str | None) -> tuple[str, str]:
    """Return ``(backend, reason)`` for a recipe's ``attention`` value on ``device``.

    ``device=None`` means "not known yet" (a model built on the CPU before being moved): "auto"
    then gives "sdpa" and "xformers" is only checked for importability; call again with the
    real device once the model is there.

    >>> resolve_attention_backend("auto", "cpu")
    ('sdpa', 'auto on cpu: xformers has no CPU kernels, using torch scaled_dot_product_attention')
    """
    check_attention_choice(requested)
    if requested == "sdpa":
        return "sdpa", "sdpa requested"
    if device is None:
        if requested == "auto":
            return "sdpa", "auto before the device is known: sdpa until set_attention_backend is called"
        xops, reason = _import_xformers_ops()
        if xops is None:
            raise AttentionBackendError(f"attention='xformers' requested but unavailable: {reason}")
        return "xformers", f"xformers requested ({reason}); device not known yet, probe deferred"
    device = torch.device(device)
    if device.type != "cuda":
        reason = f"xformers has no {device.type.upper()} kernels"
        if requested == "xformers":
            raise AttentionBackendError(
                f"attention='xformers' requested on {device}, but {reason}; use attention='auto' or 'sdpa'"
            )
        return "sdpa", f"auto on {device}: {reason}, using torch scaled_dot_product_attention"
    if device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    works, reason = _probe_xformers(str(device))
    if works:
        return "xformers", f"{requested} on {device}: {reason}"
    if requested == "xformers":
        raise AttentionBackendError(f"attention='xformers' requested on {device} but unavailable: {reason}")
    return "sdpa", f"auto on {device}: {reason}; using torch scaled_dot_product_attention"


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v with inputs and output in (B, N, H, Dh) layout, via PyTorch SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """The same attention through xformers ``memory_efficient_attention`` ((B, N, H, Dh) in and out)."""
    if not q.is_cuda:
        raise AttentionBackendError(
            f"xformers attention needs CUDA tensors, got {q.device}; call set_attention_backend('auto', device) "
            "after moving the model, or use attention='sdpa'"
        )
    xops, reason = _import_xformers_ops()
    if xops is None:
        raise AttentionBackendError(f"xformers attention selected but unavailable: {reason}")
    return xops.memory_efficient_attention(q, k, v, p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al., 2017) with a switchable kernel.

    Drop-in ``attn_layer`` for ``timm.models.vision_transformer.Block``: same constructor
    keywords and parameter names (``qkv``, ``proj``) as timm's ``Attention``. ``backend``
    ("sdpa" or "xformers") is a plain attribute; change it with :meth:`set_backend`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        backend: str = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must divide dim ({dim}); got {num_heads}")
        if qk_norm or scale_norm:
            raise ValueError("qk_norm and scale_norm are not supported by vlmask's Attention; got True")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = "sdpa"
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend = backend

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("vlmask's Attention is bidirectional without masks; got attn_mask/is_causal")
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, Dh)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.backend == "xformers":
            out = xformers_attention(q, k, v, dropout_p)
        else:
            out = sdpa_attention(q, k, v, dropout_p)
        return self.proj_drop(self.proj(out.reshape(batch, tokens, width)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend}"


def set_attention_backend(model: nn.Module, requested: str, device: torch.device | str | None) -> tuple[str, str]:
    """Resolve ``requested`` on ``device`` and switch every :class:`Attention` inside ``model``."""
    backend, reason = resolve_attention_backend(requested, device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_backend(backend)
    return backend, reason


def infer_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer (None for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None
