"""Speed features that issue 6 asks about, measured before adopting them (CPU here).

    python benchmarks/speed_features.py [--reps 20] [--vitb-reps 5] [--out FILE.json]

Each comparison runs its candidates interleaved (ABBA) on the same inputs and weights, after
checking that they compute the same thing, with ``torch.set_num_threads(1)``:

(a) the teacher's forward context: ``torch.no_grad()`` (what the teachers use) against
    ``torch.inference_mode()`` followed by ``.clone()`` (an inference tensor cannot be saved for
    the student's backward, so a loss that uses the targets needs a normal copy). The teacher
    is the encoder on *all* tokens: demo scale (width 192, depth 4, 256 tokens, batch 16) and
    ViT-B (1568 tokens, batch 1).
(b) the tubelet embedding (forward + weight gradient, as in training: the pixels need none):
    ``nn.Conv3d`` on the (B, C, T, H, W) clip as loaded, the same convolution with input and
    weight in ``channels_last_3d``, and the same weights applied as one matmul to the clip
    reshaped into tubelets. Demo (batch 16, 8 x 64 x 64, 2 x 8 x 8) and paper (batch 4,
    16 x 224 x 224, 2 x 16 x 16) scale.
(c) bf16 autocast against fp32 for the demo encoder's forward + backward on 28 visible tokens
    (``train.precision=bf16`` on the CPU).

JSON to ``--out`` (default ``benchmarks/results/speed-features-<date>-<time>.json``) and stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import compare, interleaved, load_average  # noqa: E402  (the same timing rules)

from vlmask_plugins.encoders.vit import VideoViT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"num_frames": 8, "img_size": 64, "patch": 8, "tubelet": 2, "embed_dim": 192, "depth": 4, "num_heads": 3}
VIT_B = {"num_frames": 16, "img_size": 224, "patch": 16, "tubelet": 2, "embed_dim": 768, "depth": 12, "num_heads": 12}


def teacher_case(config: dict[str, int], batch: int, reps: int) -> dict[str, Any]:
    encoder = VideoViT(**config).eval()
    video = torch.randn(batch, 3, config["num_frames"], config["img_size"], config["img_size"])

    def no_grad() -> Tensor:
        with torch.no_grad():
            return encoder(video, None)

    def inference_mode() -> Tensor:
        with torch.inference_mode():
            out = encoder(video, None)
        return out.clone()

    torch.testing.assert_close(no_grad(), inference_mode())
    return compare(interleaved({"inference_mode": inference_mode, "no_grad": no_grad}, reps, 1), "inference_mode", "no_grad")


def tubelets_as_rows(video: Tensor, tubelet: int, patch: int) -> Tensor:
    """(B, C, T, H, W) -> (B, N, C * tubelet * patch * patch), rows ordered (t, h, w) like the conv."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // tubelet) * (h // patch) * (w // patch), -1)


def embedding_case(batch: int, frames: int, size: int, tubelet: int, patch: int, dim: int, reps: int) -> dict[str, Any]:
    conv = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
    conv_cl = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
    conv_cl.load_state_dict(conv.state_dict())
    conv_cl = conv_cl.to(memory_format=torch.channels_last_3d)
    linear_weight = nn.Parameter(conv.weight.detach().reshape(dim, -1).clone())
    linear_bias = nn.Parameter(conv.bias.detach().clone())
    video = torch.randn(batch, 3, frames, size, size)
    video_cl = video.contiguous(memory_format=torch.channels_last_3d)

    def run_conv(module: nn.Module, clip: Tensor) -> Callable[[], Tensor]:
        def step() -> Tensor:
            module.zero_grad(set_to_none=True)
            out = module(clip).flatten(2).transpose(1, 2)
            out.square().mean().backward()
            return out
        return step

    def run_matmul() -> Tensor:
        linear_weight.grad = linear_bias.grad = None
        out = F.linear(tubelets_as_rows(video, tubelet, patch), linear_weight, linear_bias)
        out.square().mean().backward()
        return out

    reference = run_conv(conv, video)()
    torch.testing.assert_close(run_conv(conv_cl, video_cl)(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_matmul(), reference, rtol=1e-4, atol=1e-4)
    fns = {"conv3d": run_conv(conv, video), "conv3d_channels_last": run_conv(conv_cl, video_cl), "matmul": run_matmul}
    times = interleaved(fns, reps, 2)
    return {
        "vs_conv3d_channels_last": compare(times, "conv3d_channels_last", "conv3d"),
        "vs_conv3d_matmul": compare(times, "matmul", "conv3d"),
    }


def precision_case(reps: int) -> dict[str, Any]:
    encoder = VideoViT(**DEMO)
    video = torch.randn(16, 3, DEMO["num_frames"], DEMO["img_size"], DEMO["img_size"])
    index = torch.stack([torch.randperm(256)[:28] for _ in range(16)])

    def step(dtype: torch.dtype | None) -> Callable[[], Tensor]:
        def run() -> Tensor:
            encoder.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = encoder(video, index)
            out.float().square().mean().backward()
            return out
        return run

    times = interleaved({"bf16": step(torch.bfloat16), "fp32": step(None)}, reps, 2)
    record = compare(times, "bf16", "fp32")
    record["cpu_flags_bf16"] = _cpu_has("avx512_bf16") or _cpu_has("amx_bf16")
    return record


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--vitb-reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    record: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
        "cpu": platform.processor() or platform.machine(), "load_average_start": load_average(),
    }
    record["teacher_context"] = {
        "demo": teacher_case(DEMO, 16, args.reps),
        "vit_b": teacher_case(VIT_B, 1, args.vitb_reps),
    }
    record["tubelet_embedding"] = {
        "demo": embedding_case(16, 8, 64, 2, 8, 192, args.reps),
        "paper": embedding_case(4, 16, 224, 2, 16, 768, args.vitb_reps * 2),
    }
    record["autocast_bf16_vs_fp32_demo_encoder"] = precision_case(args.reps)
    record["load_average_end"] = load_average()
    out = args.out or ROOT / "benchmarks" / "results" / f"speed-features-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items()}, indent=1, default=str)[:200000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
