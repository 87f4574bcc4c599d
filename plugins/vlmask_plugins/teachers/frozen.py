"""A frozen teacher: a fixed encoder that never updates."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from vlmask_plugins.teachers.ema import frozen_copy


def load_encoder_weights(encoder: nn.Module, checkpoint: str | Path) -> None:
    """Load a safetensors file of encoder weights strictly; keys may carry an ``encoder.`` prefix."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"teacher 'frozen': checkpoint {str(path)!r} does not exist")
    state = load_file(str(path))
    if state and all(key.startswith("encoder.") for key in state):
        state = {key[len("encoder.") :]: value for key, value in state.items()}
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"teacher 'frozen': {path} does not match the encoder: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
        )


class FrozenTeacher(nn.Module):
    """A fixed network used as teacher (e.g. a pretrained encoder; thesis and FILS ablations).

    The teacher is a copy of the student's encoder architecture, with the weights of
    ``checkpoint`` (a safetensors file of encoder weights, loaded strictly: a missing or
    unexpected key is an error; keys may be prefixed ``encoder.``) or, when ``checkpoint`` is
    None, the student's encoder weights at construction (a frozen random-init teacher unless
    the student was initialised from pretrained weights). It never updates; ``module`` offers
    only ``"encoder"`` (no projection copy, so language-space targets use the student's theta
    under no_grad).
    """

    def __init__(self, student: nn.Module, checkpoint: str | None = None) -> None:
        super().__init__()
        encoder = getattr(student, "encoder", None)
        if encoder is None:
            raise ValueError("teacher 'frozen' needs a student with an encoder")
        self.encoder = frozen_copy(encoder)
        if checkpoint is not None:
            load_encoder_weights(self.encoder, checkpoint)
        self.checkpoint = checkpoint

    def module(self, name: str) -> nn.Module | None:
        return self.encoder if name == "encoder" else None

    def init_share(self, step: int) -> float:
        """A frozen teacher never moves: it holds all of its initial weights."""
        return 1.0

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, video: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder(video, None)

    def update(self, student: nn.Module, step: int) -> None:
        """A frozen teacher does not follow the student."""
