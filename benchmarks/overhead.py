"""What vlmask's abstractions cost on top of the same computation written by hand from torch/timm parts.

    python benchmarks/overhead.py [--reps 30] [--vitb-reps 7] [--skip-vitb] [--out FILE.json]

Three measurements, all on the CPU, fp32, with ``torch.set_num_threads(1)`` (one thread: the
machine is shared, and one thread gives the steadiest timings), the same inputs and the same
weights for both sides (copied, and checked to give the same output before timing):

(a) encoder forward + backward: ``vlmask_plugins.encoders.vit.VideoViT`` against a bare model made
    of a Conv3d patch embedding, the same sin-cos positions, the same ``torch.gather`` of the
    visible tokens, a ``nn.Sequential`` of stock ``timm.models.vision_transformer.Block`` (timm's
    own attention) and a LayerNorm. The loss is ``out.square().mean()``; gradients are reset
    (``set_to_none``) inside the timed region on both sides. Two scales: the demo recipes'
    (width 192, depth 4, 3 heads, 8 x 64 x 64 clips, patch 8, tubelet 2, batch 16, tube mask 0.9:
    28 of 256 tokens visible) and ViT-B (16 x 224 x 224, patch 16, tubelet 2, batch 2, 160 of
    1568 tokens visible).
(b) the whole MAE training step at demo scale: ``vlmask.step.build_step(load_recipe(
    "recipes/mae.yaml"), plugins).step`` (a TrainStep, no data) on ``vlmask.bench.synthetic_batch``, against
    the same step assembled by hand: tube mask (argsort of uniform noise), the bare encoder, the
    VideoMAE decoder (linear to width 128, mask token, positions, 2 timm blocks, LayerNorm,
    pixel head), normalised-pixel targets, MSE, backward, gradient clipping at 1.0 (the demo
    recipes clip), AdamW with the same two parameter groups and the same warmup/cosine lr.
    The first step's loss is compared before timing (same weights, same mask).
(c) per-step dispatch: the ``vlmask_after_optimizer_step`` hook call the engine makes every step
    (``train_step.hooks.vlmask_after_optimizer_step(step=..., run=train_step.run)``) and the mask
    generator's construction (``train_step.mask_generator(step)``), each timed over many calls, as
    a fraction of the median demo-scale vlmask step of (b). MAE registers no implementation of
    that hook, so the call is pure pluggy dispatch; it is timed again with the MAE+CLIP recipes'
    ``VideoTextInfoNCEHead`` registered (its implementation clamps the logit scale).

Both sides of every comparison run interleaved (ABBA order), so a load that changes during the
run affects both. Reported: median ms, overhead as the ratio of the medians minus one and as the
median of the per-repetition ratios minus one; the load average before and after each part.
The JSON record goes to ``--out`` (default ``benchmarks/results/overhead-<date>-<time>.json``) and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vlmask.bench import synthetic_batch
from vlmask.config import load_recipe
from vlmask.plugins import default_plugins, run_manager
from vlmask.step import TrainStep, build_step
from vlmask.types import IMAGENET_MEAN, IMAGENET_STD, Batch, TokenGrid
from vlmask_plugins.encoders.attention import Attention
from vlmask_plugins.encoders.vit import VideoViT
from vlmask_plugins.heads.video_text import VideoTextInfoNCEHead
from vlmask_plugins.maskers.tube import TubeMasker

ROOT = Path(__file__).resolve().parents[1]



def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------- the hand-written models


class BareEncoder(nn.Module):
    """Patch embedding, positions, gather of the visible tokens, stock timm blocks, LayerNorm."""

    def __init__(self, grid: TokenGrid, dim: int, depth: int, heads: int,
                 attn_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        kernel = (grid.tubelet, grid.patch, grid.patch)
        self.patch_embed = nn.Conv3d(3, dim, kernel_size=kernel, stride=kernel)
        self.register_buffer("pos_embed", torch.zeros(1, grid.num_tokens, dim), persistent=False)
        layer = {} if attn_layer is None else {"attn_layer": attn_layer}  # None: timm's own Attention
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, **layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, video: Tensor, index: Tensor) -> Tensor:
        tokens = self.patch_embed(video).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.norm(self.blocks(tokens))


class BareDecoder(nn.Module):
    """VideoMAE's decoder: project, add positions, append mask tokens, timm blocks, pixel head."""

    def __init__(self, grid: TokenGrid, encoder_dim: int, dim: int, depth: int, heads: int, out: int,
                 attn_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.zeros(1, grid.num_tokens, dim), persistent=False)
        layer = {} if attn_layer is None else {"attn_layer": attn_layer}
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, **layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out)

    def forward(self, features: Tensor, visible: Tensor, masked: Tensor) -> Tensor:
        pos = self.pos_embed.expand(features.shape[0], -1, -1)
        visible_pos = torch.gather(pos, 1, visible.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        masked_pos = torch.gather(pos, 1, masked.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        tokens = torch.cat([self.embed(features) + visible_pos, self.mask_token + masked_pos], dim=1)
        return self.head(self.norm(self.blocks(tokens)[:, visible.shape[1]:]))


def copy_into(bare: nn.Module, reference: nn.Module) -> None:
    """Same weights (strict: every parameter name must match) and the same position table."""
    bare.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        bare.pos_embed.copy_(reference.pos_embed)


# --------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` times each, in ABBA order after ``warmup`` calls each."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def compare(times: dict[str, list[float]], subject: str, baseline: str) -> dict[str, Any]:
    a, b = times[subject], times[baseline]
    return {
        "median_ms": {n: round(1000 * statistics.median(t), 2) for n, t in times.items()},
        "overhead_pct_ratio_of_medians": round(100 * (statistics.median(a) / statistics.median(b) - 1), 2),
        "overhead_pct_median_of_pair_ratios": round(100 * (statistics.median(x / y for x, y in zip(a, b)) - 1), 2),
        "overhead_pct_pair_ratio_quartiles": [round(100 * (q - 1), 2) for q in
                                              statistics.quantiles([x / y for x, y in zip(a, b)], n=4)[::2]]
        if len(a) > 1 else None,
        "reps": len(a),
        "all_ms": {n: [round(1000 * v, 2) for v in t] for n, t in times.items()},
    }


# --------------------------------------------------------------------------- (a) encoder


def encoder_case(name: str, frames: int, size: int, patch: int, dim: int, depth: int, heads: int,
                 batch: int, reps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    vit = VideoViT(num_frames=frames, img_size=size, tubelet=2, patch=patch, embed_dim=dim, depth=depth,
                   num_heads=heads, attention="sdpa")
    grid = vit.grid
    bare = BareEncoder(grid, dim, depth, heads)
    bare_vlmask_attention = BareEncoder(grid, dim, depth, heads, attn_layer=Attention)
    copy_into(bare, vit)
    copy_into(bare_vlmask_attention, vit)
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 3, frames, size, size, generator=generator)
    mask = TubeMasker(0.9)(Batch(video=video), grid, torch.Generator().manual_seed(2))
    index = mask.visible
    with torch.no_grad():
        reference = vit(video, index)
        difference = max((reference - m(video, index)).abs().max().item() for m in (bare, bare_vlmask_attention))

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(video, index).square().mean().backward()
        return run

    load_before = load_average()
    times = interleaved({"vlmask": step(vit), "bare_timm": step(bare),
                         "bare_timm_vlmask_attention": step(bare_vlmask_attention)}, reps, warmup)
    result = {"case": name, "dim": dim, "depth": depth, "heads": heads, "clip": f"{frames}x{size}x{size}",
              "patch": patch, "tubelet": 2, "batch": batch, "tokens": grid.num_tokens,
              "visible_tokens": int(index.shape[1]), "max_abs_output_difference": difference,
              "load_avg_before": load_before, "load_avg_after": load_average(),
              **compare(times, "vlmask", "bare_timm")}
    wrapper = compare(times, "vlmask", "bare_timm_vlmask_attention")
    attention = compare(times, "bare_timm_vlmask_attention", "bare_timm")
    # The same attention layer on both sides: what is left is the wrapper (engine or encoder class).
    result["wrapper_overhead_pct"] = {k: wrapper[k] for k in wrapper if k.startswith("overhead")}
    result["attention_layer_difference_pct"] = {k: attention[k] for k in attention if k.startswith("overhead")}
    print(f"(a) {name}: {result['median_ms']} overhead {result['overhead_pct_ratio_of_medians']}% "
          f"(paired {result['overhead_pct_median_of_pair_ratios']}%); wrapper alone {result['wrapper_overhead_pct']}, "
          f"vlmask Attention vs timm's {result['attention_layer_difference_pct']}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- (b) the MAE step


def pixel_targets(video: Tensor, grid: TokenGrid) -> Tensor:
    """VideoMAE's normalised-pixel targets of every token, (B, N, t*p*p*3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    b, t, p = video.shape[0], grid.tubelet, grid.patch
    pixels = (video * std + mean).reshape(b, 3, grid.t, t, grid.h, p, grid.w, p)
    tubelets = pixels.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, grid.num_tokens, t * p * p, 3)
    tubelets = (tubelets - tubelets.mean(dim=-2, keepdim=True)) / (tubelets.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return tubelets.reshape(b, grid.num_tokens, -1)


class HandMAE:
    """The demo MAE step (recipes/mae.yaml) written directly with torch and timm."""

    def __init__(self, train_step: TrainStep, attn_layer: type[nn.Module] | None = None) -> None:
        encoder, predictor = train_step.student.encoder, train_step.student.predictor
        self.grid: TokenGrid = train_step.grid
        self.encoder = BareEncoder(self.grid, encoder.embed_dim, len(encoder.blocks), encoder.blocks[0].attn.num_heads,
                                   attn_layer)
        self.decoder = BareDecoder(self.grid, encoder.embed_dim, predictor.dim, len(predictor.blocks),
                                   predictor.blocks[0].attn.num_heads, predictor.out_width, attn_layer)
        copy_into(self.encoder, encoder)
        copy_into(self.decoder, predictor)
        self.num_masked = int(train_step.masker.ratio * self.grid.spatial)
        self.seed, self.total, self.warmup = train_step.seed, train_step.total_steps, train_step.warmup_steps
        self.lr, self.min_lr, self.warmup_lr = train_step.lr, train_step.min_lr, train_step.warmup_lr
        self.clip = float(train_step.train_cfg.grad_clip or 0.0)
        cfg = train_step.optim_cfg
        self.params = [p for m in (self.encoder, self.decoder) for p in m.parameters()]
        named = [(n, p) for m in (self.encoder, self.decoder) for n, p in m.named_parameters()]
        no_decay = [p for n, p in named if p.ndim <= 1 or "mask_token" in n or "pos_embed" in n]
        decay = [p for n, p in named if not (p.ndim <= 1 or "mask_token" in n or "pos_embed" in n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=self.warmup_lr, betas=tuple(cfg.betas), eps=cfg.eps)

    def mask(self, batch_size: int, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4099)  # the engine's seeding
        order = torch.rand(batch_size, self.grid.spatial, generator=generator).argsort(dim=1)
        masked, visible = order[:, :self.num_masked].sort(dim=1).values, order[:, self.num_masked:].sort(dim=1).values
        offsets = torch.arange(self.grid.t)[None, :, None] * self.grid.spatial
        return (offsets + visible[:, None]).reshape(batch_size, -1), (offsets + masked[:, None]).reshape(batch_size, -1)

    def loss(self, video: Tensor, step: int) -> Tensor:
        visible, masked = self.mask(video.shape[0], step)
        predictions = self.decoder(self.encoder(video, visible), visible, masked)
        with torch.no_grad():
            targets = pixel_targets(video, self.grid)
            targets = torch.gather(targets, 1, masked.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
        return F.mse_loss(predictions, targets)

    def step(self, video: Tensor, step: int) -> Tensor:
        if step < self.warmup:
            lr = self.warmup_lr + (self.lr - self.warmup_lr) * step / max(1, self.warmup)
        else:
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            lr = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(video, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return loss.detach()


def build_train_step(batch_size: int) -> TrainStep:
    """The demo MAE TrainStep as a run builds it (the process's plugins take part in its hooks), without data."""
    recipe = load_recipe(ROOT / "recipes" / "mae.yaml",
                         ["device=cpu", "train.precision=fp32", f"train.batch_size={batch_size}"])
    plugins = default_plugins()
    return build_step(recipe, plugins, manager=run_manager(plugins))


def step_case(batch_size: int, reps: int, warmup: int) -> tuple[dict[str, Any], TrainStep, float]:
    torch.manual_seed(0)
    train_step = build_train_step(batch_size)
    hands = {"hand": HandMAE(train_step), "hand_vlmask_attention": HandMAE(train_step, Attention)}
    batch = synthetic_batch(train_step, batch_size, "cpu")
    with torch.no_grad():
        hand_first = {name: hand.loss(batch.video, 0).item() for name, hand in hands.items()}
    vlmask_first = train_step.step(batch, 0)["loss"].item()  # same weights and mask as hand_first
    for hand in hands.values():
        hand.step(batch.video, 0)
    counter = {"vlmask": 1, **{name: 1 for name in hands}}

    def vlmask_step() -> None:
        train_step.step(batch, counter["vlmask"])
        counter["vlmask"] += 1

    def hand_step(name: str) -> Callable[[], None]:
        def run() -> None:
            hands[name].step(batch.video, counter[name])
            counter[name] += 1
        return run

    load_before = load_average()
    times = interleaved({"vlmask": vlmask_step, **{name: hand_step(name) for name in hands}}, reps, warmup)
    hand = hands["hand"]
    result = {"recipe": "recipes/mae.yaml", "batch": batch_size, "tokens": train_step.grid.num_tokens,
              "visible_tokens": train_step.grid.num_tokens - train_step.grid.t * hand.num_masked,
              "grad_clip": hand.clip, "first_step_loss": {"vlmask": vlmask_first, **hand_first},
              "load_avg_before": load_before, "load_avg_after": load_average(),
              **compare(times, "vlmask", "hand")}
    wrapper = compare(times, "vlmask", "hand_vlmask_attention")
    # The same attention layer on both sides: what is left is the wrapper (engine or encoder class).
    result["wrapper_overhead_pct"] = {k: wrapper[k] for k in wrapper if k.startswith("overhead")}
    print(f"(b) MAE step: {result['median_ms']} overhead {result['overhead_pct_ratio_of_medians']}% "
          f"(paired {result['overhead_pct_median_of_pair_ratios']}%); engine alone {result['wrapper_overhead_pct']}; "
          f"first loss {result['first_step_loss']}", file=sys.stderr)
    return result, train_step, statistics.median(times["vlmask"])


# --------------------------------------------------------------------------- (c) dispatch


def per_call_us(fn: Callable[[], Any], calls: int, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(samples)


def dispatch_case(train_step: TrainStep, step_s: float, calls: int) -> dict[str, Any]:
    hook = train_step.hooks.vlmask_after_optimizer_step
    implementations = [impl.plugin_name for impl in hook.get_hookimpls()]
    load_before = load_average()
    hook_us = per_call_us(lambda: hook(step=1, run=train_step.run), calls)
    generator_us = per_call_us(lambda: train_step.mask_generator(1), calls)
    masker_batch = Batch(video=torch.empty(16, 3, 8, 64, 64))
    masker_us = per_call_us(lambda: train_step.masker(masker_batch, train_step.grid, train_step.mask_generator(1)),
                            calls // 10)
    # The same call with one implementation registered: the MAE+CLIP recipes' video-text head,
    # whose hook clamps its logit scale (registered the way the engine registers components).
    head = VideoTextInfoNCEHead()
    train_step.manager.register(head, name="benchmark:video_text_head")
    try:
        hook_one_us = per_call_us(lambda: hook(step=1, run=train_step.run), calls)
    finally:
        train_step.manager.unregister(head)
    step_us = 1e6 * step_s
    result = {
        "hook": "vlmask_after_optimizer_step", "hook_implementations": implementations, "calls": calls,
        "hook_us_per_step": round(hook_us, 2), "mask_generator_us_per_step": round(generator_us, 2),
        "hook_with_video_text_head_us": round(hook_one_us, 2),
        "hook_with_video_text_head_pct_of_step": round(100 * hook_one_us / step_us, 4),
        "dispatch_us_per_step": round(hook_us + generator_us, 2),
        "demo_step_ms": round(step_s * 1000, 2),
        "dispatch_pct_of_step": round(100 * (hook_us + generator_us) / step_us, 4),
        "masker_call_us_for_reference": round(masker_us, 2),
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }
    print(f"(c) hook {hook_us:.1f} us + generator {generator_us:.1f} us = {result['dispatch_pct_of_step']}% of a "
          f"{step_s * 1000:.0f} ms step (implementations: {implementations}); with the video-text head's clamp "
          f"{hook_one_us:.1f} us", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- report


def markdown(record: dict[str, Any]) -> str:
    def cells(case: dict[str, Any], baseline: str) -> str:
        wrapper = case["wrapper_overhead_pct"]
        return (f"{case['median_ms']['vlmask']:.1f} | {case['median_ms'][baseline]:.1f} | "
                f"{case['overhead_pct_ratio_of_medians']:+.1f}% / {case['overhead_pct_median_of_pair_ratios']:+.1f}% | "
                f"{case['median_ms'][baseline + '_vlmask_attention']:.1f} | "
                f"{wrapper['overhead_pct_ratio_of_medians']:+.1f}% / "
                f"{wrapper['overhead_pct_median_of_pair_ratios']:+.1f}% | "
                f"{case['reps']} |")

    lines = ["| comparison | vlmask ms | by hand, timm Attention, ms | overhead (medians / pairs) "
             "| by hand, vlmask's Attention, ms | overhead without the attention layer (medians / pairs) | reps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in record["encoder"]:
        lines.append(f"| encoder fwd+bwd, {case['case']} (width {case['dim']}, depth {case['depth']}, "
                     f"batch {case['batch']}, "
                     f"{case['visible_tokens']}/{case['tokens']} tokens) | " + cells(case, "bare_timm"))
    step = record["step"]
    lines.append(f"| MAE train step, demo (batch {step['batch']}) | " + cells(step, "hand"))
    d = record["dispatch"]
    lines += ["", f"Per-step dispatch: hook {d['hook_us_per_step']:.1f} us + mask generator "
                  f"{d['mask_generator_us_per_step']:.1f} us = {d['dispatch_pct_of_step']:.3f}% of a "
                  f"{d['demo_step_ms']:.0f} ms demo step (no implementation registered for MAE); with the "
                  f"video-text head's clamp registered the hook costs {d['hook_with_video_text_head_us']:.1f} us "
                  f"({d['hook_with_video_text_head_pct_of_step']:.3f}%)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per side at demo scale")
    parser.add_argument("--vitb-reps", type=int, default=7, help="timed repetitions per side at ViT-B scale")
    parser.add_argument("--skip-vitb", action="store_true")
    parser.add_argument("--calls", type=int, default=20000, help="calls per sample for (c)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.chdir(ROOT)
    started = time.time()
    record: dict[str, Any] = {
        "benchmark": "overhead",
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": load_average()},
        "torch": str(torch.__version__), "timm": timm.__version__, "threads": torch.get_num_threads(),
        "dtype": "float32", "attention": "sdpa (both sides)",
    }
    record["encoder"] = [encoder_case("demo", 8, 64, 8, 192, 4, 3, 16, args.reps, 3)]
    if not args.skip_vitb:
        record["encoder"].append(encoder_case("ViT-B", 16, 224, 16, 768, 12, 12, 2, args.vitb_reps, 1))
    record["step"], train_step, step_s = step_case(16, args.reps, 3)
    with train_step:
        record["dispatch"] = dispatch_case(train_step, step_s, args.calls)
    record["machine"]["load_avg_end"] = load_average()
    record["wall_s"] = round(time.time() - started, 1)
    out = args.out or ROOT / "benchmarks" / "results" / f"overhead-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record), file=sys.stderr)
    machine = record["machine"]
    print(f"raw results: {out}; load average {machine['load_avg_start']} -> {machine['load_avg_end']}",
          file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
