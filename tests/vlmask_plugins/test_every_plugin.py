"""Contract checks over the whole registry: every registered plugin is covered by construction."""

import inspect

import pytest

from vlmask.plugins import default_plugins
from vlmask.schema import INJECTED, factory_parameters

ENTRIES = default_plugins().registry.entries()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.kind}:{e.name}")
def test_factory_is_documented_and_typed(entry):
    assert entry.summary, f"{entry.kind} {entry.name!r} needs a docstring (cite the paper)"
    for name, (annotation, required) in factory_parameters(entry.factory).items():
        if name == "**":
            continue
        assert annotation is not inspect.Parameter.empty, f"{entry.kind} {entry.name!r}: argument {name!r} has no type"


def test_the_registry_covers_the_first_slice():
    names = {(e.kind, e.name) for e in ENTRIES}
    assert {("masker", "tube"), ("encoder", "video_vit"), ("predictor", "transformer"),
            ("target", "normalized_pixels"), ("dataset", "video_manifest")} <= names


def test_injected_arguments_are_the_documented_ones():
    assert set(INJECTED) == {"grid", "encoder", "encoder_dim", "text_dim", "num_classes", "student", "total_steps"}
