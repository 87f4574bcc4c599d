"""Training throughput and FLOP counts of a recipe (``vlmask bench``).

Two measurements, both of the step the engine trains with (``vlmask.step.TrainStep.step``,
built here directly from ``build_components``, never through a Trainer):

``count_flops(recipe)``
    FLOPs of ONE training step per clip: student forward and backward plus the teacher's
    forward, counted by :class:`torch.utils.flop_counter.FlopCounterMode` around the real
    ``TrainStep.step`` on the ``meta`` device (optimizer and after-step work included), so
    nothing is computed and a paper-scale ViT-B step costs only the time to build the model.
    Conventions (those of shared/specs/reference-semantics.md): 2 FLOPs per multiply-add;
    matmuls, linear layers, convolutions and attention are counted, elementwise work (norms,
    softmax, GELU, losses, AdamW, the EMA update) is not; attention is counted as
    its two matmuls (``QK^T`` and ``AV``), PyTorch's math formulation, so a trained part costs
    3x its forward (a fused kernel's backward, as ``FlopCounterMode`` rates flash attention,
    would add the recomputed ``QK^T``). The patch embedding's backward computes only its weight
    gradient (the pixels need none), so it costs 2x its forward.

``benchmark(recipe)``
    Warm-up then timed ``TrainStep.step`` calls on synthetic tensors shaped like the
    recipe's clips (or, with ``loader=True``, batches from the recipe's real data loader,
    ``vlmask.engine.TrainData``); median step time, clips/s, peak memory, model FLOP
    utilisation on known GPUs, and a per-phase split of the same step, timed by phase timers
    inside ``TrainStep.step`` itself (there is no copy of the step here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.flop_counter as flop_counter
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlmask import parallel
from vlmask.config import load_recipe
from vlmask.engine import TrainData, build_training, peak_memory_mb
from vlmask.kinds import DATASET_VIEWS
from vlmask.plugins import Plugins, default_plugins, run_manager
from vlmask.schema import settings
from vlmask.step import ON_META, PhaseTimer, TrainStep, build_step, join_processes
from vlmask.types import Batch, TokenGrid

#: Keys every ``benchmark`` result has (the CLI contract's and this module's own).
CONTRACT_KEYS: tuple[str, ...] = ("clips_per_s", "step_ms", "peak_mem_mb", "gflops_per_clip", "device")

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; matched as
#: lower-case substrings of ``torch.cuda.get_device_name`` in this order (most specific first).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("h200", 989.0),
    ("a100", 312.0),
)

#: One line for ``--help``.
DESCRIPTION = "measure training throughput of a recipe, or count the FLOPs of one training step"

#: Clips used for FLOP counting (per-clip counts do not depend on it except for the B x B
#: contrastive logits, a few kFLOPs).
FLOP_COUNT_BATCH = 2

#: Classes drawn for synthetic labels.
SYNTHETIC_CLASSES = 10


# ---------------------------------------------------------------------------------------- batches
def clip_shape(grid: TokenGrid) -> tuple[int, int, int, int]:
    """(C, T, H, W) of a clip that cuts into ``grid``."""
    return (3, grid.t * grid.tubelet, grid.h * grid.patch, grid.w * grid.patch)


def synthetic_batch(
    train_step: TrainStep, batch_size: int, device: torch.device | str, seed: int = 0, video: Tensor | None = None
) -> Batch:
    """A batch shaped like the recipe's clips: normal-noise pixels, a random unit text embedding
    (when the recipe has a text encoder), centred action boxes covering 30-60% of each side,
    labels over :data:`SYNTHETIC_CLASSES` classes and indices ``0..B-1``; noise flow images and a
    second clip (and its flow) only when the recipe's dataset gives them (``data.dataset.flow``,
    ``second_clip``), as the loader would: views nothing reads would count in the peak memory.

    ``video`` replaces the pixels (e.g. an empty ``meta`` tensor for FLOP counting).
    """
    generator = torch.Generator().manual_seed(seed)
    if video is None:
        video = torch.randn((batch_size, *clip_shape(train_step.grid)), generator=generator)
    side = 0.3 + 0.3 * torch.rand(batch_size, 2, generator=generator)  # box width, height in [0.3, 0.6]
    centre = 0.5 + (torch.rand(batch_size, 2, generator=generator) - 0.5) * (1.0 - side)  # stays in [0, 1]
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1).clamp(0.0, 1.0)
    text = None
    text_encoder = train_step.parts.text_encoder
    if text_encoder is not None:
        text = nn.functional.normalize(torch.randn(batch_size, text_encoder.dim, generator=generator), dim=-1)
    batch = Batch(
        video=video,
        index=torch.arange(batch_size),
        text_embedding=text,
        action_box=boxes,
        label=torch.randint(0, SYNTHETIC_CLASSES, (batch_size,), generator=generator),
    )
    dataset = settings(train_step.recipe, "data").dataset
    views = {need: bool(dataset.get(argument)) for need, argument in DATASET_VIEWS.items()}
    flow, second = views["flow"], views["second_clip"]
    if flow:  # CoCLR's flow view, shaped like the clip
        batch.flow = torch.randn(video.shape, generator=generator)
    if second:  # a second clip of the video (CoCLR's key view), with its flow when there is flow
        batch.second_video = torch.randn(video.shape, generator=generator)
        batch.second_flow = torch.randn(video.shape, generator=generator) if flow else None
    return batch.to(device)


# ---------------------------------------------------------------------------------------- FLOPs
def _attention_math_convention() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for CPU flash attention, which ``FlopCounterMode`` does not rate: forward
    as two matmuls, backward as twice that (the math convention used everywhere here)."""

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * flop_counter.sdpa_flop_count(query, key, value)

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


class _ForwardFlops:
    """Forward FLOPs spent inside a set of modules, from the counter's running total
    (pre/post forward hooks; nested and repeated calls are counted once each)."""

    def __init__(self, counter: FlopCounterMode, modules: Sequence[nn.Module]) -> None:
        self.counter = counter
        self.flops = 0
        self._depth = 0
        self._start = 0
        self._handles = [
            handle
            for module in modules
            for handle in (module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit))
        ]

    def _enter(self, *_: Any) -> None:
        if self._depth == 0:
            self._start = self.counter.get_total_flops()
        self._depth += 1

    def _exit(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.flops += self.counter.get_total_flops() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _FlopMarks:
    """A ``phase_watch`` for :meth:`vlmask.step.TrainStep.step`: the counter's FLOPs in each
    phase, and its per-module counts at the end of the forward and of the backward."""

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.flops: dict[str, int] = {}
        self.by_module: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.counter.get_total_flops()
        try:
            yield
        finally:
            self.flops[name] = self.flops.get(name, 0) + self.counter.get_total_flops() - start
            self.by_module[name] = {k: sum(v.values()) for k, v in self.counter.get_flop_counts().items()}


def count_step_flops(train_step: TrainStep, batch_size: int = FLOP_COUNT_BATCH) -> dict[str, Any]:
    """FLOPs per clip of the first training step (step 0, in its stage) of a TrainStep on the
    ``meta`` device (:data:`vlmask.step.ON_META`; :meth:`TrainStep.on_meta` gives one of a run's
    parts): see the module docstring.

    Runs the real ``train_step.step`` once inside ``FlopCounterMode`` on a synthetic batch of
    ``batch_size`` clips: the mask drawn by the recipe's masker on the CPU, the student's forward
    (encoder on the visible tokens, predictor, teacher forward, every loss term), the weighted
    sum and its backward, clipping, AdamW and the after-step work (teacher update, hooks), which
    are elementwise and count zero. The parts' meta weights "train" (nothing is computed).

    Returns ``gflops_per_clip``, ``breakdown`` (GFLOP per clip: ``student_forward``,
    ``student_backward``, ``teacher``, and per student part ``encoder_forward`` ... with the
    backward of each part as FlopCounterMode's module tracker attributes it), ``tokens`` and
    ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if train_step.device.type != "meta":
        raise ValueError(f"count FLOPs on a TrainStep on the meta device (TrainStep.on_meta()), "
                         f"not {train_step.device}")
    grid = train_step.grid
    batch = synthetic_batch(train_step, batch_size, "cpu", video=torch.zeros(()).expand(batch_size, *clip_shape(grid)))
    student, teacher = train_step.student, train_step.teacher
    named_parts = {name: module for name, module in (("encoder", student.encoder), ("predictor", student.predictor),
                                                      ("projection", student.projection)) if module is not None}
    counter = FlopCounterMode(display=False, custom_mapping=_attention_math_convention())
    marks = _FlopMarks(counter)
    train_step.phase_watch = marks
    try:
        with sdpa_kernel([SDPBackend.MATH]), counter:
            trackers = {name: _ForwardFlops(counter, [module]) for name, module in named_parts.items()}
            if teacher is not None:
                trackers["teacher"] = _ForwardFlops(counter, list(teacher.modules()))
            try:
                train_step.step(batch, 0)
                step_total = counter.get_total_flops()
            finally:
                for tracker in trackers.values():
                    tracker.remove()
    finally:
        train_step.phase_watch = None
    mask = train_step.masker(batch, grid, train_step.mask_generator(0))  # the step's own mask, for its counts

    def per_clip(flops: float) -> float:
        return flops / batch_size / 1e9

    forward_total, backward_total = marks.flops["student_forward"], marks.flops["student_backward"]
    forward_by_module, after_by_module = marks.by_module["student_forward"], marks.by_module["student_backward"]
    teacher_flops = trackers["teacher"].flops if teacher is not None else 0
    root = type(student).__name__
    breakdown: dict[str, float] = {
        "student_forward": per_clip(forward_total - teacher_flops),
        "student_backward": per_clip(backward_total),
        "teacher": per_clip(teacher_flops),
    }
    parts_forward = 0
    for name in named_parts:
        breakdown[f"{name}_forward"] = per_clip(trackers[name].flops)
        parts_forward += trackers[name].flops
        key = f"{root}.{name}"
        breakdown[f"{name}_backward"] = per_clip(after_by_module.get(key, 0) - forward_by_module.get(key, 0))
    breakdown["other_forward"] = per_clip(forward_total - teacher_flops - parts_forward)  # heads, targets
    rest = step_total - forward_total - backward_total
    if rest:  # masking, the optimizer and the after-step work: elementwise in every shipped part
        breakdown["outside_forward_backward"] = per_clip(rest)
    return {
        "gflops_per_clip": per_clip(step_total),
        "breakdown": breakdown,
        "tokens": {"total": grid.num_tokens, "visible": mask.num_visible, "predict": mask.num_predict},
        "batch_size": batch_size,
    }


def _counting_overrides(overrides: Sequence[str]) -> list[str]:
    """Build on the CPU in fp32 whatever the recipe says: counting needs no device or autocast."""
    return [*overrides, "device=cpu", "train.precision=fp32"]


def count_flops(
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    batch_size: int = FLOP_COUNT_BATCH,
    plugins: Plugins | None = None,
) -> dict[str, Any]:
    """FLOPs of one training step per clip of a recipe (forward + backward + teacher), without
    running it: see :func:`count_step_flops`. The parts are built on the CPU and stepped on the
    ``meta`` device in one process (even inside a torchrun job); no data is read.
    ``gflops_per_clip`` and ``breakdown`` are in GFLOP (rounded to MFLOPs), ``flops_per_clip``
    is the unrounded count in FLOP."""
    recipe = load_recipe(recipe_path, _counting_overrides(overrides))
    with build_step(recipe, plugins or default_plugins(), num_classes=SYNTHETIC_CLASSES, process=ON_META) as train_step:
        return rounded(count_step_flops(train_step, batch_size), str(recipe_path))


def rounded(result: dict[str, Any], recipe: str) -> dict[str, Any]:
    """:func:`count_step_flops`'s result as :func:`count_flops` gives it: ``recipe``,
    ``gflops_per_clip`` and ``breakdown`` rounded to MFLOPs, ``flops_per_clip`` unrounded in FLOP."""
    result = dict(result)
    breakdown = {k: round(v, 3) for k, v in result.pop("breakdown").items()}
    exact = result.pop("gflops_per_clip")
    return {"recipe": recipe, "gflops_per_clip": round(exact, 3), "flops_per_clip": exact * 1e9,
            "breakdown": breakdown, **result}


# ---------------------------------------------------------------------------------------- timing
class _Clock:
    """Wall time that waits for the device first (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _ForwardTime:
    """Wall time spent inside ``module``'s forward calls (pre/post forward hooks)."""

    def __init__(self, module: nn.Module, clock: _Clock) -> None:
        self.clock = clock
        self.seconds = 0.0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_: Any) -> None:
        self._start = self.clock.now()

    def _exit(self, *_: Any) -> None:
        self.seconds += self.clock.now() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


#: The phases of ``TrainStep.step`` that ``split_ms`` reports, in step order.
PHASES = ("mask", "student_forward", "teacher", "student_backward", "optimizer", "teacher_update", "hooks")


def timed_step(train_step: TrainStep, batch: Batch, step: int) -> dict[str, float]:
    """Run the engine's own ``TrainStep.step`` once with a :class:`~vlmask.step.PhaseTimer`
    watching, and return seconds per phase (:data:`PHASES`) plus ``step`` (the wall time of the
    whole call). ``teacher`` (the teacher's forward, timed by forward hooks) is taken out of
    ``student_forward``, the phase it runs in."""
    clock = _Clock(train_step.device)
    timer = PhaseTimer(train_step.device)
    teacher_time = _ForwardTime(train_step.teacher, clock) if train_step.teacher is not None else None
    train_step.phase_watch = timer
    try:
        start = clock.now()
        train_step.step(batch, step)
        wall = clock.now() - start
    finally:
        train_step.phase_watch = None
        if teacher_time is not None:
            teacher_time.remove()
    phases = {name: timer.seconds.get(name, 0.0) for name in PHASES}
    phases["teacher"] = teacher_time.seconds if teacher_time is not None else 0.0
    phases["student_forward"] -= phases["teacher"]
    return {**phases, "step": wall}


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from :data:`BF16_PEAK_TFLOPS`, or None when unknown.

    >>> bf16_peak_tflops("NVIDIA H100 80GB HBM3"), bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), bf16_peak_tflops("cpu")
    (989.0, 312.0, None)
    """
    name = device_name.lower()
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_ms(values: Sequence[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def benchmark(
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    steps: int = 20,
    warmup: int = 5,
    loader: bool = False,
    split_steps: int = 3,
    threads: int | None = None,
    plugins: Plugins | None = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps of a recipe after ``warmup`` untimed ones.

    Synthetic tensors by default (one batch of ``train.batch_size`` clips made once, so only
    the step is timed); ``loader=True`` builds the recipe's data and fetches every batch from
    its DataLoader inside the timed step (the fetch is also reported as ``data_ms``).
    Then ``split_steps`` more ``TrainStep.step`` calls are timed per phase by
    :func:`timed_step` (their median per phase is ``split_ms``, whose sum ``split_total_ms``
    is close to ``step_ms``; ``split_step_ms`` is the median wall time of those calls), and a
    meta copy of the parts (:meth:`TrainStep.on_meta`) counts ``gflops_per_clip``
    (:func:`count_step_flops`). The TrainStep is built as a run builds it (the process's
    plugins take part in its hooks), without a run directory.

    ``peak_mem_mb`` is ``torch.cuda.max_memory_allocated`` over warm-up and timed steps on
    CUDA, the process's peak resident set (``ru_maxrss``, model building included) on CPU;
    ``peak_mem_source`` says which. ``mfu`` (CUDA only, else None) is achieved model FLOP/s
    over the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`; None for unknown devices).
    ``threads`` sets ``torch.set_num_threads`` first (None keeps torch's setting).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("split_steps", split_steps, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    recipe = load_recipe(recipe_path, list(overrides))
    plugins = plugins or default_plugins()
    process = join_processes(recipe)
    data: TrainData | None = None
    if loader:
        data, train_step = build_training(recipe, plugins, process,
                                          lambda line: print(line, file=sys.stderr, flush=True))
    else:
        train_step = build_step(recipe, plugins, num_classes=SYNTHETIC_CLASSES, process=process,
                                manager=run_manager(plugins))
    with train_step:
        return _benchmark(train_step, data, str(recipe_path), steps, warmup, split_steps)


def _benchmark(train_step: TrainStep, data: TrainData | None, recipe: str, steps: int, warmup: int,
               split_steps: int) -> dict[str, Any]:
    """Batches from ``data``'s loader, or one synthetic batch when it is None."""
    device = train_step.device
    clock = _Clock(device)
    batch_size = int(train_step.train_cfg.batch_size)
    train_step.student.train()
    batches: Iterator[Batch] | None = None
    fixed: Batch | None = None
    if data is not None:
        from vlmask.data_loading import infinite

        batches = infinite(data.loader, data.batches, 0, 0)
    else:
        fixed = synthetic_batch(train_step, batch_size, device, seed=train_step.seed)

    def next_batch() -> Batch:
        if batches is None:
            assert fixed is not None
            return fixed
        assert data is not None
        return data.prepare(next(batches))  # to the device, cached text embeddings attached

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    warmup_s: list[float] = []  # with train.compile the first steps include compilation
    for _ in range(warmup):
        t0 = clock.now()
        train_step.step(next_batch(), step)
        warmup_s.append(clock.now() - t0)
        step += 1
    step_s: list[float] = []
    data_s: list[float] = []
    for _ in range(steps):
        t0 = clock.now()
        batch = next_batch()
        t1 = clock.now()
        train_step.step(batch, step)
        t2 = clock.now()
        step_s.append(t2 - t0)
        data_s.append(t1 - t0)
        step += 1
    state_bytes = parallel.training_state_bytes(train_step.student, train_step.teacher, train_step.optimizer)
    peak_mb = peak_memory_mb(device)
    splits: list[dict[str, float]] = []
    split_walls: list[float] = []
    for _ in range(split_steps):
        split = timed_step(train_step, next_batch(), step)
        split_walls.append(split.pop("step"))
        splits.append(split)
        step += 1

    clips_per_s = batch_size * steps / sum(step_s)
    with train_step.on_meta() as on_meta:  # a meta copy of the parts, sharded or not
        flops = count_step_flops(on_meta)
    name = device_name(device)
    peak = bf16_peak_tflops(name) if device.type == "cuda" else None
    achieved_tflops = flops["gflops_per_clip"] * clips_per_s / 1e3
    result: dict[str, Any] = {
        "recipe": recipe,
        "clips_per_s": round(clips_per_s, 3),
        "step_ms": _median_ms(step_s),
        "peak_mem_mb": round(peak_mb, 1),
        "peak_mem_source": "cuda_max_memory_allocated" if device.type == "cuda" else "ru_maxrss (process peak RSS)",
        "gflops_per_clip": round(flops["gflops_per_clip"], 3),
        "achieved_tflops": round(achieved_tflops, 4),
        "mfu": round(achieved_tflops / peak, 4) if peak else None,
        "peak_bf16_tflops": peak,
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "precision": train_step.precision,
        "attention": train_step.attention,
        "batch_size": batch_size,
        "world_size": train_step.world_size,
        "parallel": train_step.parallel,
        "training_state_mb_per_rank": {k: round(v / 2**20, 3) for k, v in state_bytes.items()},
        "steps": steps,
        "warmup": warmup,
        "data": "loader" if data is not None else "synthetic tensors",
        "compile": bool(train_step.train_cfg.compile),
        "warmup_step_ms": [round(1000 * t, 3) for t in warmup_s],
        # time spent in the warm-up beyond as many ordinary steps: compilation (and first-call setup)
        "warmup_overhead_s": round(sum(warmup_s) - len(warmup_s) * statistics.median(step_s), 3) if warmup_s else None,
        "split_ms": {k: _median_ms([s[k] for s in splits]) for k in splits[0]} if splits else {},
        "flops_breakdown": {k: round(v, 3) for k, v in flops["breakdown"].items()},
        "torch": str(torch.__version__),
    }
    if splits:
        result["split_total_ms"] = round(sum(result["split_ms"].values()), 3)
        result["split_step_ms"] = _median_ms(split_walls)  # the same timed calls, whole
    if data is not None:
        result["data_ms"] = _median_ms(data_s)
    return result


# ---------------------------------------------------------------------------------------- CLI
def _add_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options of ``vlmask bench``; ``defaults=False`` leaves every default None (for merging)."""

    def default(value: Any) -> Any:
        return value if defaults else None

    parser.add_argument("--flops", action="store_true", help="only count the FLOPs of one step (no timing)")
    parser.add_argument("--steps", type=int, default=default(20), help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=default(5), help="untimed steps first (default 5)")
    parser.add_argument("--loader", action="store_true", help="feed steps from the recipe's data loader")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vlmask bench RECIPE [KEY=VALUE ...] [--flops] [--out FILE] ...``.

    The engine's CLI adds the sub-command and calls :func:`cmd_bench`. Options may come before
    or after RECIPE and between overrides (``vlmask bench RECIPE --flops KEY=VALUE`` as in the
    contract): everything after RECIPE is collected raw and parsed by :func:`cmd_bench`.
    """
    parser.add_argument("recipe")
    _add_flags(parser, defaults=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="recipe overrides (dotted keys)")


def _late_arguments(rest: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlmask bench RECIPE", description=DESCRIPTION)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (dotted keys)")
    _add_flags(parser, defaults=False)
    return parser.parse_intermixed_args(list(rest))


def cmd_bench(args: argparse.Namespace) -> int:
    """Print one JSON object on stdout (and write it to ``--out``); logs go to stderr."""
    late = _late_arguments(getattr(args, "rest", None) or [])
    flops = args.flops or late.flops
    loader = args.loader or late.loader
    steps = late.steps if late.steps is not None else args.steps
    warmup = late.warmup if late.warmup is not None else args.warmup
    threads = late.threads if late.threads is not None else args.threads
    out = late.out if late.out is not None else args.out
    overrides = [*getattr(args, "overrides", []), *late.overrides]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout one JSON object
        if flops:
            result = count_flops(args.recipe, overrides)
        else:
            result = benchmark(args.recipe, overrides, steps=steps, warmup=warmup, loader=loader, threads=threads)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmask.bench RECIPE [KEY=VALUE ...] [--flops] ...`` (same as ``vlmask bench``)."""
    parser = argparse.ArgumentParser(prog="python -m vlmask.bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
