"""One intra-op thread for these tests: the probes run thousands of tiny matrix products, which
stall badly when several threads compete for two busy cores."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
