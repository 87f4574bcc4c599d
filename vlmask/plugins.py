"""Loading plugins: built-ins and third-party distributions through one entry-point group.

Every distribution with an entry point in the group ``vlmask`` is a plugin; vlmask's own
plugins (``vlmask_plugins.builtin``) come through the same group. A plugin that fails to import
or to register is reported with its distribution and skipped; the rest keeps working.

Environment switches (pytest's model):
- ``VLMASK_DISABLE_PLUGIN_AUTOLOAD=1``: load only vlmask's own entry points.
- ``VLMASK_BLOCK_PLUGINS=name,dist``: skip these entry-point or distribution names.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from vlmask import hookspecs
from vlmask.registry import Registry, RegistryError

ENTRY_POINT_GROUP = "vlmask"
DISABLE_AUTOLOAD_ENV = "VLMASK_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "VLMASK_BLOCK_PLUGINS"
OWN_DISTRIBUTION = "vlmask"


class PluginError(RuntimeError):
    """A plugin problem that must stop the host (e.g. two plugins claiming one name)."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was reported and skipped."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.distribution} was skipped: {self.error}"


@dataclass
class Plugins:
    """The loaded plugins: the pluggy manager, the registry they filled, what was skipped."""

    manager: pluggy.PluginManager
    registry: Registry
    failures: list[PluginFailure] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    distributions: dict[str, str] = field(default_factory=dict)  # plugin name -> "dist version"


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("vlmask")
    manager.add_hookspecs(hookspecs)
    return manager


def run_manager(plugins: "Plugins") -> pluggy.PluginManager:
    """A run's own plugin manager: a new one holding the process's loaded ``plugins`` (a run's
    parts then join it for the run's duration, ``vlmask.step.TrainStep``), so a run's hook
    implementations never reach the process-wide manager or another run."""
    manager = new_manager()
    for plugin in plugins.manager.get_plugins():
        manager.register(plugin, name=plugins.manager.get_name(plugin))
    return manager


def _env_list(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def _distribution(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution", ""
    return dist.metadata["Name"] or "unknown distribution", dist.version or ""


def load_plugins(extra: list[tuple[str, ModuleType | Any]] | None = None) -> Plugins:
    """Load every plugin and let each register its factories.

    ``extra``: ``(name, module_or_object)`` pairs registered in-process after the entry points
    (for programmatic use and tests), reported as provided by ``<name> (in-process)``.
    """
    manager = new_manager()
    plugins = Plugins(manager=manager, registry=Registry())
    blocked = _env_list(BLOCK_ENV)
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}

    loaded: list[tuple[str, Any, str]] = []
    seen: set[str] = set()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name != "builtin", e.name)):
        dist_name, version = _distribution(ep)
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        if ep.name in blocked or dist_name in blocked:
            plugins.blocked.append(ep.name)
            continue
        if not autoload and dist_name != OWN_DISTRIBUTION:
            plugins.blocked.append(ep.name)
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the host down
            plugins.failures.append(PluginFailure(ep.name, dist_name, _describe(exc)))
            continue
        loaded.append((ep.name, module, f"{dist_name} {version}".strip()))
    for name, obj in extra or []:
        loaded.append((name, obj, f"{name} (in-process)"))

    for name, obj, provider in loaded:
        try:
            manager.register(obj, name=name)
        except Exception as exc:
            plugins.failures.append(PluginFailure(name, provider, _describe(exc)))
            continue
        if misspelt := unknown_hooks(manager, obj):  # it would register silently and never run
            manager.unregister(obj)
            plugins.failures.append(PluginFailure(name, provider, "; ".join(misspelt)))
            continue
        plugins.distributions[name] = provider
        _call_register(plugins, name, provider)
    return plugins


def unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """What ``plugin`` implements (``@hookimpl``) that no vlmask hook declares, each with the nearest
    hook's name: pluggy accepts such an implementation without a word and never calls it (pytest
    calls ``check_pending()`` for this; vlmask checks each plugin as it registers, so the report names
    the plugin). An implementation marked ``optionalhook=True`` is allowed, as in pluggy.

    >>> from vlmask import hookimpl
    >>> class Misspelt:
    ...     @hookimpl
    ...     def vlmask_after_optimiser_step(self, step): ...
    >>> manager = new_manager(); plugin = Misspelt(); _ = manager.register(plugin)
    >>> unknown_hooks(manager, plugin)
    ['implements vlmask_after_optimiser_step, which is not a vlmask hook; did you mean vlmask_after_optimizer_step?']
    """
    found = []
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.has_spec() or all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            continue
        nearest = difflib.get_close_matches(caller.name, hookspecs.HOOKS, n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}?" if nearest else f"vlmask's hooks are {', '.join(hookspecs.HOOKS)}"
        found.append(f"implements {caller.name}, which is not a vlmask hook; {hint}")
    return found


def _call_register(plugins: Plugins, name: str, provider: str) -> None:
    """Run one plugin's registration hook, attributing what it registers to its provider."""
    caller = plugins.manager.subset_hook_caller(
        "vlmask_register_plugins",
        remove_plugins=[p for p in plugins.manager.get_plugins() if plugins.manager.get_name(p) != name],
    )
    try:
        caller(register=plugins.registry.registrar(provider))
    except RegistryError as exc:
        if "registered twice" in str(exc):
            raise PluginError(f"{exc}. Block one of them with {BLOCK_ENV}=<plugin or distribution name>.") from None
        plugins.failures.append(PluginFailure(name, provider, str(exc)))
    except Exception as exc:
        plugins.failures.append(PluginFailure(name, provider, _describe(exc)))


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


@functools.lru_cache(maxsize=1)
def default_plugins() -> Plugins:
    """The process-wide plugins (loaded once)."""
    return load_plugins()
