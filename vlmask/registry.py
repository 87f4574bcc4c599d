"""The plugin registry: (kind, name) -> factory, with errors that say what exists.

Plugins add factories through the ``vlmask_register_plugins(register)`` hook; recipes select
them by name. Lookups of an unknown name list the registered names of that kind and suggest
the nearest one (mmengine's bare "X is not in the registry" is the anti-example).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

#: The closed set of plugin kinds. Adding a kind is a design change (CONTRIBUTING.md).
KINDS: dict[str, str] = {
    "masker": "chooses visible and predicted tokens (vlmask.types.Masker)",
    "encoder": "the student video encoder: (video, token index) -> features",
    "predictor": "predicts features or pixels at the masked positions",
    "teacher": "gives target features without gradient (EMA copy, frozen network)",
    "target": "a loss on predictions against targets (pixels, latent, language space)",
    "head": "a loss on the student's features (video-text contrastive, classification)",
    "text_encoder": "a frozen text tower: captions -> embeddings",
    "dataset": "a clip dataset built from a manifest",
    "action_area": "detects the action area (box) of a clip",
    "captioner": "writes captions for clips that have none",
    "evaluator": "computes evaluation metrics of a trained encoder",
    "logger": "receives lifecycle events (metrics, checkpoints) of a run",
}


class Register(Protocol):
    """The callable handed to ``vlmask_register_plugins``: ``register(kind, name, factory)``."""

    def __call__(self, kind: str, name: str, factory: Callable[..., Any]) -> None: ...


class RegistryError(LookupError):
    """An unknown kind or name, or a duplicate registration."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    provider: str  # distribution (or plugin) that registered it

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.factory)

    @property
    def defaults(self) -> dict[str, Any]:
        """The factory's keyword arguments that have a default, with it (:func:`factory_defaults`)."""
        return factory_defaults(self.factory)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def factory_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """``{argument: default}`` for every argument of ``factory`` that has a default: the one
    place a plugin's defaults are read (validation fills them in, ``eval.json`` records them).

    >>> def masker(ratio: float, mode: str = "tube", *args, **kwargs): ...
    >>> factory_defaults(masker)
    {'mode': 'tube'}
    """
    return {name: p.default for name, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry:
    """Factories by (kind, name). ``registry.get("masker", "tube")`` returns the entry."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def add(self, kind: str, name: str, factory: Callable[..., Any], provider: str) -> None:
        if kind not in KINDS:
            raise RegistryError(
                f"{provider} registers {name!r} under unknown kind {kind!r}; "
                f"kinds are: {', '.join(KINDS)}.{_nearest(kind, list(KINDS))}"
            )
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{provider} registers a {kind} with an empty or non-string name {name!r}")
        if not callable(factory):
            raise RegistryError(f"{provider} registers {kind} {name!r} with a non-callable factory {factory!r}")
        key = (kind, name)
        if key in self._entries:
            other = self._entries[key].provider
            raise RegistryError(f"{kind} {name!r} is registered twice: by {other} and by {provider}")
        self._entries[key] = Entry(kind, name, factory, provider)

    def registrar(self, provider: str) -> Register:
        """The ``register`` callable a given provider's hook receives."""

        def register(kind: str, name: str, factory: Callable[..., Any]) -> None:
            self.add(kind, name, factory, provider)

        return register

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        """Registered names of ``kind`` matching a shell-style wildcard (timm's ``list_models``)."""
        self._check_kind(kind)
        return sorted(n for (k, n) in self._entries if k == kind and fnmatch.fnmatchcase(n, pattern))

    def entries(self, kind: str | None = None) -> list[Entry]:
        return sorted(
            (e for e in self._entries.values() if kind is None or e.kind == kind),
            key=lambda e: (e.kind, e.name),
        )

    def get(self, kind: str, name: str) -> Entry:
        self._check_kind(kind)
        try:
            return self._entries[(kind, name)]
        except KeyError:
            known = self.names(kind)
            listing = ", ".join(known) if known else "(none registered)"
            raise RegistryError(
                f"unknown {kind} {name!r}.{_nearest(str(name), known)} Registered {kind}s: {listing}"
            ) from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise RegistryError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}.{_nearest(kind, list(KINDS))}")
