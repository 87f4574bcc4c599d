"""The table of plugin kinds: what the engine and the rest of vlmask use of each kind.

Every plugin kind has a :class:`typing.Protocol` (``runtime_checkable``) stating the attributes
and methods the code that calls it relies on; :data:`PROTOCOLS` maps each kind to them. The
engine checks every component it builds against its kind (``vlmask.schema.build``) and the test
suite builds every registered plugin at tiny scale and checks it
(``tests/vlmask/test_kinds.py``), so a plugin that breaks its contract fails by name.

What a plugin needs from the rest of the recipe
-----------------------------------------------
Targets, heads and maskers declare what they require, so that ``vlmask validate`` catches a
missing predictor or teacher before the first training step. A factory declares either

* a class attribute ``requires: frozenset[str] = frozenset({"predictor", "teacher"})`` when the
  needs do not depend on the arguments, or
* a classmethod ``requirements(**kwargs) -> frozenset[str]`` when they do; it is called with the
  recipe node's arguments (without ``name``) and must not build anything: e.g. the
  ``video_text_infonce`` head needs ``action_box`` only with ``pooling="action_area"``.

The names come from the closed set :data:`REQUIREMENTS`. ``validate`` turns a missing
``predictor``, ``teacher``, ``projection``, ``text_embedding``, ``flow`` or ``second_clip`` (the
dataset's ``flow: true`` / ``second_clip: true``) into an error naming the file and key; ``action_box`` and ``label`` live in the data, so ``validate`` reports them as notes
(:func:`vlmask.schema.requirements_report`), never as errors.

>>> sorted(REQUIREMENTS)
['action_box', 'flow', 'label', 'predictor', 'projection', 'second_clip', 'teacher', 'text_embedding']
>>> class NeedsTeacher:
...     requires = frozenset({"teacher"})
>>> sorted(requirements_of(NeedsTeacher, {}))
['teacher']
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from vlmask.features import Evaluator
from vlmask.types import Batch, Mask, Masker, Objective, TokenGrid

if TYPE_CHECKING:
    import numpy as np

#: What a target, head or masker may require, and what provides it.
REQUIREMENTS: dict[str, str] = {
    "predictor": "a predictor (model.predictor) giving predictions at the masked tokens",
    "teacher": "a teacher (teacher:) giving target features",
    "projection": "the student's video-to-text projection (model.projection: true, with a text_encoder)",
    "text_embedding": "a caption embedding per clip (a text_encoder and captions in the manifest)",
    "action_box": "an action box per clip (action_box in the manifest, or an action-area detector)",
    "label": "a class label per clip (label in the manifest)",
    "flow": "optical-flow images per clip (data.dataset.flow: true; CoCLR's second view)",
    "second_clip": "a second clip of each video, sampled and augmented apart (data.dataset.second_clip: true)",
}

#: Requirements the dataset provides as extra views of each clip, and the ``data.dataset``
#: argument that turns each on: ``validate`` names it when missing, the bench's synthetic batch
#: carries the views the recipe turns on, evaluation and finetuning turn them off (they read
#: ``video`` alone).
DATASET_VIEWS: dict[str, str] = {"flow": "flow", "second_clip": "second_clip"}

#: ``data.dataset`` arguments that only pretraining applies (a paper's pretraining augmentation,
#: e.g. DPC's frame-wise colour jitter): evaluation, ``embed`` and finetuning build their datasets
#: with each set to None (off), as they turn off :data:`DATASET_VIEWS`.
TRAINING_AUGMENTATIONS: tuple[str, ...] = ("color_jitter", "blur")

#: What evaluation, ``embed`` and finetuning pass to a dataset factory that takes it (and only
#: then): every :data:`DATASET_VIEWS` argument False, every :data:`TRAINING_AUGMENTATIONS` one None.
WITHOUT_TRAINING_VIEWS: dict[str, bool | None] = ({argument: False for argument in DATASET_VIEWS.values()}
                                                  | {argument: None for argument in TRAINING_AUGMENTATIONS})

#: Requirements that the data, not the recipe, provides: reported as notes by ``validate``.
DATA_REQUIREMENTS: frozenset[str] = frozenset({"action_box", "label"})


class RequirementError(ValueError):
    """A factory declares a requirement outside :data:`REQUIREMENTS`, or computes it wrongly."""


def requirements_of(factory: Callable[..., Any], arguments: dict[str, Any]) -> frozenset[str]:
    """What the plugin ``factory(**arguments)`` would require, read without building it.

    A ``requirements(**arguments)`` classmethod wins over a ``requires`` attribute; a factory
    with neither requires nothing. Raises :class:`RequirementError` for a name outside
    :data:`REQUIREMENTS`.
    """
    compute = getattr(factory, "requirements", None)
    if callable(compute):
        try:
            found = compute(**arguments)
        except TypeError as exc:  # arguments that do not fit: validate reports those elsewhere
            raise RequirementError(f"{getattr(factory, '__name__', factory)}.requirements: {exc}") from None
    else:
        found = getattr(factory, "requires", frozenset())
    found = frozenset(found)
    unknown = sorted(found - set(REQUIREMENTS))
    if unknown:
        raise RequirementError(
            f"{getattr(factory, '__name__', factory)} requires {', '.join(map(repr, unknown))}, "
            f"not among the known requirements: {', '.join(REQUIREMENTS)}"
        )
    return found


# --------------------------------------------------------------------------- protocols


@runtime_checkable
class NoWeightDecay(Protocol):
    """An optional member of encoders, predictors and heads with parameters (timm's convention):
    ``no_weight_decay()`` names the part's own parameters (relative to the part, e.g.
    ``{"pos_embed"}``) that AdamW must not decay. The engine exempts them, with every 1-D
    parameter and every bias, under the part's path in the student (``encoder.pos_embed``); a
    part without the method declares nothing (a Protocol cannot make a member optional, so the
    engine asks ``isinstance(part, NoWeightDecay)`` instead of requiring it). A part holding
    another part (a predictor wrapping a transformer) declares the inner names with their prefix.
    """

    def no_weight_decay(self) -> set[str]: ...


@runtime_checkable
class SwitchesAttention(Protocol):
    """An optional member of any module of the student or teacher (encoders, predictors):
    ``set_attention_backend(requested=None, device=None) -> (backend, reason)`` picks its
    attention kernel for ``device`` (``requested``: that backend instead of its own choice).
    The engine calls it on every module that has it once the parts are placed."""

    def set_attention_backend(self, requested: str | None = None,
                              device: torch.device | str | None = None) -> tuple[str, str]: ...


@runtime_checkable
class HasBlocks(Protocol):
    """An optional member of encoders and predictors: ``blocks``, the transformer blocks in
    order (an ``nn.ModuleList``). FSDP shards each block apart (else the part as a whole);
    finetuning's layer-wise lr decay counts them (without: ``finetune.layer_decay`` must be 1)."""

    blocks: torch.nn.Module


@runtime_checkable
class HasFinalNorm(Protocol):
    """An optional member of encoders: ``norm``, the final LayerNorm, which finetuning replaces
    by the identity (VideoMAE: ``fc_norm`` after pooling takes its place)."""

    norm: torch.nn.Module


@runtime_checkable
class MirroringTeacher(Protocol):
    """An optional member of teachers: ``mirrored``, the names of the student parts it keeps a
    copy of (``module(name)`` gives each); FSDP shards each apart. Without it: encoder and
    projection."""

    mirrored: Sequence[str]


@runtime_checkable
class LabelledDataset(Protocol):
    """Optional members of datasets: ``label_ids``, the class index of every clip (-1:
    unlabelled), in ``classes``, and ``labels``, the class name of every clip (None:
    unlabelled); finetuning trains on the labelled clips, evaluation scores them."""

    label_ids: Sequence[int]
    labels: Sequence[Any]


@runtime_checkable
class VerbNounDataset(Protocol):
    """Optional members of datasets whose classes are (verb, noun) pairs (EPIC-KITCHENS style):
    ``verbs`` and ``nouns``, one per clip (None: unknown); accuracy is then also scored on each."""

    verbs: Sequence[Any]
    nouns: Sequence[Any]


@runtime_checkable
class DecodingDataset(Protocol):
    """Optional members of datasets: ``decoder``, the video decoder chosen, and
    ``decoder_reason``, why (printed at the start of a run, recorded in ``config.yaml``)."""

    decoder: str | None
    decoder_reason: str | None


@runtime_checkable
class CollatingDataset(Protocol):
    """An optional member of datasets: ``collate(items) -> Batch``; without it, the
    ``collate`` function of the dataset's module (see :class:`Dataset`)."""

    def collate(self, items: list[Any]) -> Batch: ...


@runtime_checkable
class ManifestLinesDataset(Protocol):
    """An optional member of datasets: ``clips``, one record per row whose ``line`` is the
    manifest line it came from (1-based); ``vlmask embed`` and ``vlmask show`` name lines with it.
    Without it, rows are taken to be the manifest's lines in order."""

    clips: Sequence[Any]


@runtime_checkable
class TokenEvaluator(Protocol):
    """An optional member of evaluators: ``token_budget``, the most tokens per clip it reads from
    ``features.*.tokens`` (extraction keeps that many, pooling spatially above it); without it,
    no tokens are extracted for it."""

    token_budget: int


@runtime_checkable
class ContextFeatures(Protocol):
    """An optional member of predictors that aggregate past blocks into a context: DPC's and
    MemDPC's ``c_t = g(z_1, ..., z_t)`` (Han, thesis 2022, eq. 2.2 and 3.2), which the thesis
    evaluates instead of the block features z (sec. 3.4, lines 678 and 689: "extract the context
    feature c_t ... then we spatially pool the context feature"; DPC: sec. 2.4, line 428).

    ``context(features)`` takes the encoder's features of every token of a clip (B, N, D), in
    grid order, and returns the context after aggregating all of the clip's blocks as tokens
    (B, N', D'); ``context_grid()`` is the :class:`TokenGrid` those N' tokens form (pooling and
    the token budget read it). ``evaluation.features: context`` probes these instead of the
    encoder's tokens; ``vlmask validate`` refuses that setting for a predictor without them.
    Both are methods, so a registered class is checked with ``issubclass`` before it is built."""

    def context(self, features: Tensor) -> Tensor: ...

    def context_grid(self) -> TokenGrid: ...


def offers_context(factory: Any) -> bool | None:
    """Whether the predictor ``factory`` builds parts with :class:`ContextFeatures`, read without
    building one: True or False for a class, None (unknown until built) for a factory function.

    >>> class Aggregates:
    ...     def context(self, features): return features
    ...     def context_grid(self): return TokenGrid(1, 1, 1)
    >>> offers_context(Aggregates), offers_context(object), offers_context(lambda: Aggregates())
    (True, False, None)
    """
    if not inspect.isclass(factory):
        return None
    return issubclass(factory, ContextFeatures)


@runtime_checkable
class CheckpointDefaults(Protocol):
    """An optional member of any module of a checkpointed part: ``checkpoint_defaults() ->
    {local name: tensor}``, the state that checkpoints written before the module had it stand
    for (``vlmask.checkpoint.with_checkpoint_defaults``)."""

    def checkpoint_defaults(self) -> dict[str, Tensor]: ...


#: kind -> the optional members its components may have, each a Protocol to test with
#: ``isinstance`` (never a probe by name): what the engine reads when present.
OPTIONAL: dict[str, tuple[type, ...]] = {
    "encoder": (NoWeightDecay, SwitchesAttention, HasBlocks, HasFinalNorm, CheckpointDefaults),
    "predictor": (NoWeightDecay, SwitchesAttention, HasBlocks, ContextFeatures, CheckpointDefaults),
    "target": (NoWeightDecay, CheckpointDefaults),
    "head": (NoWeightDecay, CheckpointDefaults),
    "teacher": (MirroringTeacher, SwitchesAttention, CheckpointDefaults),
    "dataset": (LabelledDataset, VerbNounDataset, DecodingDataset, CollatingDataset, ManifestLinesDataset),
    "evaluator": (TokenEvaluator,),
}


def no_weight_decay_of(part: Any) -> set[str]:
    """The parameter names ``part`` exempts from weight decay (empty when it declares none).

    >>> class Learned:
    ...     def no_weight_decay(self) -> set[str]:
    ...         return {"pos_embed"}
    >>> sorted(no_weight_decay_of(Learned())), no_weight_decay_of(object())
    (['pos_embed'], set())
    """
    return set(part.no_weight_decay()) if isinstance(part, NoWeightDecay) else set()


@runtime_checkable
class Encoder(Protocol):
    """kind ``encoder``: the student video encoder (an ``nn.Module``).

    ``grid`` is its token grid (the engine checks the clips against it), ``embed_dim`` its
    feature width D; ``forward(video, index)`` maps clips (B, C, T, H, W) and the visible token
    indices (B, Nv) (or None: every token) to features (B, Nv, D). Optional:
    ``no_weight_decay()`` (:class:`NoWeightDecay`).
    """

    grid: TokenGrid
    embed_dim: int

    def forward(self, video: Tensor, index: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Predictor(Protocol):
    """kind ``predictor``: ``forward(visible_features (B, Nv, D), mask) -> (B, Np, D_out)``.
    Optional: ``no_weight_decay()`` (:class:`NoWeightDecay`)."""

    def forward(self, visible_features: Tensor, mask: Mask) -> Tensor: ...


@runtime_checkable
class Teacher(Protocol):
    """kind ``teacher`` (an ``nn.Module`` built with the ``student``): target features without gradient.

    ``forward(video)`` gives features of every token (B, N, D); ``update(student, step)`` is
    called once per optimizer step (an EMA moves, a frozen teacher does nothing);
    ``module(name)`` returns the teacher's copy of a student part (``"projection"``) or None;
    ``init_share(step)`` is the share of its initial weights it still holds after ``step`` updates
    (1.0 for a teacher that never moves; logged as ``teacher_init_share``). Optional:
    ``mirrored`` (:class:`MirroringTeacher`).
    """

    def forward(self, video: Tensor) -> Tensor: ...

    def update(self, student: torch.nn.Module, step: int) -> None: ...

    def module(self, name: str) -> torch.nn.Module | None: ...

    def init_share(self, step: int) -> float: ...


@runtime_checkable
class TextEncoder(Protocol):
    """kind ``text_encoder``: a frozen text tower, captions -> embeddings (FILS, BMVC 2024).

    ``dim`` is the embedding width, ``identity`` keys the caption-embedding cache (equal
    identities give equal embeddings), ``encode`` returns (len(texts), dim) float32 on CPU.
    """

    dim: int
    identity: str

    def encode(self, texts: list[str], batch_size: int = 64) -> Tensor: ...


@runtime_checkable
class Dataset(Protocol):
    """kind ``dataset``: clips of a manifest, built with ``manifest=`` and ``train=``.

    ``__getitem__`` returns a dict the dataset's collate function (its ``collate`` attribute or
    its module's ``collate``) turns into a :class:`vlmask.types.Batch`. ``captions`` (one string
    per clip, "" when none), ``classes`` (the class names) and ``skipped`` (lines that could not
    be read) are read by the engine, evaluation and finetuning. Optional members
    (:data:`OPTIONAL`): ``label_ids``, ``verbs``/``nouns``, ``decoder``/``decoder_reason``, ``collate``.
    """

    captions: Sequence[str]
    classes: Sequence[str]

    @property
    def skipped(self) -> Sequence[Any]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@runtime_checkable
class ActionAreaDetector(Protocol):
    """kind ``action_area``: the action box of a clip, as fractions (x0, y0, x1, y1).

    ``detect_file(path, start, end)`` is what ``vlmask data boxes`` needs. Optional extras:
    ``detect_file_area(path, start, end)`` returning an object with ``box`` and ``fallback``
    (fallbacks are then counted), and ``params() -> dict`` (JSON-able; without it the results
    are not cached, since nothing would tell two detectors' boxes apart).
    """

    def detect_file(self, path: Any, start: float | None = None, end: float | None = None) -> Any: ...


@runtime_checkable
class Captioner(Protocol):
    """kind ``captioner`` reading pixels: sampled frames of one clip -> a caption."""

    identity: str

    def caption(self, frames: list["np.ndarray"]) -> str: ...


@runtime_checkable
class RowCaptioner(Protocol):
    """kind ``captioner`` reading the manifest line, not the pixels: a row -> a caption or None."""

    identity: str

    def caption_row(self, row: dict[str, Any]) -> str | None: ...


@runtime_checkable
class Logger(Protocol):
    """kind ``logger``: a pluggy hook implementation receiving the run's metrics.

    It implements ``vlmask_step_end(step, metrics, run)`` (see ``vlmask.hookspecs``) and may
    implement any other lifecycle hook (``vlmask_train_start``, ``vlmask_train_end``, ...).
    """

    def vlmask_step_end(self, step: int, metrics: dict[str, Any], run: Any) -> None: ...


#: kind -> the protocols an object of that kind satisfies (any one of them).
PROTOCOLS: dict[str, tuple[type, ...]] = {
    "masker": (Masker,),
    "target": (Objective,),
    "head": (Objective,),
    "teacher": (Teacher,),
    "encoder": (Encoder,),
    "predictor": (Predictor,),
    "text_encoder": (TextEncoder,),
    "dataset": (Dataset,),
    "action_area": (ActionAreaDetector,),
    "captioner": (Captioner, RowCaptioner),
    "evaluator": (Evaluator,),
    "logger": (Logger,),
}


def missing_members(kind: str, component: Any) -> list[str]:
    """Members of the kind's protocol that ``component`` lacks (empty: it conforms).

    With several protocols (captioners), the shortest list of the nearest one.

    >>> missing_members("evaluator", object())
    ['evaluate']
    """
    best: list[str] | None = None
    for protocol in PROTOCOLS[kind]:
        members = sorted(_protocol_members(protocol))
        missing = [m for m in members if not hasattr(component, m)]
        missing += [m for m in members if m not in missing and _is_method(protocol, m) and not callable(getattr(component, m))]
        if best is None or len(missing) < len(best):
            best = missing
    return best or []


def partial_optional_members(kind: str, component: Any) -> list[str]:
    """The optional members (:data:`OPTIONAL`) that ``component`` has only in part (``verbs``
    without ``nouns``) or with a method that is not callable: an optional member is all or
    nothing, since the engine reads it through ``isinstance`` with its Protocol.

    >>> class Half:
    ...     verbs = ["cut"]
    >>> partial_optional_members("dataset", Half())
    ['VerbNounDataset: nouns']
    """
    broken = []
    for protocol in OPTIONAL.get(kind, ()):
        members = sorted(_protocol_members(protocol))
        if not any(hasattr(component, m) for m in members):
            continue
        lacking = [m for m in members if not hasattr(component, m)
                   or (_is_method(protocol, m) and not callable(getattr(component, m)))]
        if lacking:
            broken.append(f"{protocol.__name__}: {', '.join(lacking)}")
    return broken


def conforms(kind: str, component: Any) -> bool:
    """Whether ``component`` satisfies one of its kind's protocols (``isinstance``)."""
    return any(isinstance(component, protocol) for protocol in PROTOCOLS[kind])


def _protocol_members(protocol: type) -> set[str]:
    members = getattr(protocol, "__protocol_attrs__", None)
    if members is None:  # Python < 3.12
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]

        members = _get_protocol_attrs(protocol)
    return set(members)


def _is_method(protocol: type, name: str) -> bool:
    return inspect.isfunction(inspect.getattr_static(protocol, name, None))


__all__ = [
    "WITHOUT_TRAINING_VIEWS", "REQUIREMENTS", "DATA_REQUIREMENTS", "RequirementError", "requirements_of", "PROTOCOLS",
    "NoWeightDecay", "no_weight_decay_of", "OPTIONAL", "SwitchesAttention", "HasBlocks", "HasFinalNorm",
    "MirroringTeacher", "LabelledDataset", "VerbNounDataset", "DecodingDataset", "CollatingDataset",
    "ManifestLinesDataset", "TokenEvaluator", "ContextFeatures", "offers_context", "CheckpointDefaults",
    "partial_optional_members",
    "Masker", "Objective", "Encoder", "Predictor", "Teacher", "TextEncoder", "Dataset",
    "ActionAreaDetector", "Captioner", "RowCaptioner", "Evaluator", "Logger", "Batch",
    "missing_members", "conforms",
]
