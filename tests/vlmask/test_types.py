"""vlmask.types: the shared token gather and the normalisation constants."""

from __future__ import annotations

import doctest

import torch

import vlmask.types as types_module
from vlmask.types import gather_tokens


def test_docstring_examples() -> None:
    result = doctest.testmod(types_module, raise_on_error=False)
    assert result.failed == 0 and result.attempted > 0


def test_gather_tokens_broadcasts_a_shared_table_and_accepts_int32_indices() -> None:
    table = torch.randn(1, 5, 3)
    index = torch.tensor([[4, 0], [2, 2]], dtype=torch.int32)
    out = gather_tokens(table, index)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[1, 0], table[0, 2])
    per_clip = torch.randn(2, 5, 3)
    torch.testing.assert_close(gather_tokens(per_clip, index)[0, 0], per_clip[0, 4])
