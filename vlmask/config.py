"""Recipes: YAML files composed from bases, overridden on the command line, with provenance.

A recipe is plain YAML. ``base: [other.yaml, ...]`` (paths relative to the file) are merged left
to right, then the file itself, then ``KEY=VALUE`` / ``~KEY`` command-line overrides. OmegaConf
``${...}`` interpolation resolves at the end. Every leaf remembers where it was set
(``recipes/mae.yaml:14`` or ``command line: masker.ratio=0.8``), so every error names the file
and key that set the offending value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """One or more problems with a recipe; ``problems`` lists each with file and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"- {p}" for p in problems))


@dataclass
class Recipe:
    """A resolved recipe and where each of its values came from."""

    path: Path
    config: DictConfig
    provenance: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    interpolations: dict[str, str] = field(default_factory=dict)  # key -> the key its ${...} copies

    @property
    def name(self) -> str:
        return self.path.stem

    def where(self, key: str, _through: frozenset[str] = frozenset()) -> str:
        """The source of ``key`` (or of its nearest parent that has one); a key that copies
        another (``${other}``) names where that one was set. ``_through``: the keys already
        followed, so that interpolations pointing at each other end instead of recursing."""
        probe = key
        while probe:
            if probe in self.provenance:
                source = self.provenance[probe]
                copied = self.interpolations.get(probe)
                followed = _through | {probe}
                if copied is not None and copied not in followed and copied in self.provenance:
                    origin = self.where(copied, followed)
                    if origin != source:
                        return f"{origin} (through ${{{copied}}} at {source})"
                return source
            probe = probe.rpartition(".")[0]
        return str(self.path)

    def get(self, key: str, default: Any = None) -> Any:
        value = OmegaConf.select(self.config, key, default=default)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


#: The most values (mapping keys, values and list items, counted after YAML aliases are
#: expanded) one recipe document or command-line value may hold. Shipped recipes hold < 100;
#: a few hundred bytes of nested ``&anchor``/``*alias`` (an "alias bomb") expand to billions.
MAX_EXPANDED_NODES = 10_000


class _TooLarge(Exception):
    pass


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of nodes ``root`` holds once every alias is expanded, counted on the composed
    graph (an alias is a shared node there, so each distinct node is visited once); raises
    ``_TooLarge`` as soon as the count passes ``limit`` or a node contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _TooLarge("an alias refers to a node that contains it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > limit:
            raise _TooLarge(f"it expands to more than {limit:,} values through YAML aliases (&anchor / *alias), "
                            "more than any recipe needs (an alias bomb?)")
        sizes[key] = total
        return total

    return size(root)


def safe_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load(text)`` and its composed node graph, refusing, before anything is built,
    a document that expands past :data:`MAX_EXPANDED_NODES` values (an alias bomb) or that nests
    too deeply; each refusal is a one-line ``RecipeError`` naming ``source``."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _expanded_size(node, MAX_EXPANDED_NODES)
            return loader.construct_document(node), node
        except _TooLarge as exc:
            raise RecipeError([f"{source}: refused: {exc}"]) from None
        except RecursionError:
            raise RecipeError([f"{source}: refused: the YAML nests too deeply"]) from None
    finally:
        loader.dispose()


def _key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Line number (1-based) of every mapping key in a composed YAML document, by dotted path."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = f"{prefix}.{i}"
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    if root is not None:
        walk(root, "")
    return lines


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a container's leaves and of every node (so parents have provenance)."""
    keys = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            keys += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            keys += _leaves(v, f"{prefix}.{i}")
    return keys


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _load_file(path: Path, provenance: dict[str, str], chain: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise RecipeError([f"{_display(path)}: base recipes form a cycle: {cycle}"])
    if not path.is_file():
        where = f" (named in {_display(chain[-1])}, key base)" if chain else ""
        raise RecipeError([f"{_display(path)}: recipe file not found{where}"])
    text = path.read_text()
    try:
        raw, root = safe_yaml(text, _display(path))
    except yaml.YAMLError as exc:
        raise RecipeError([f"{_display(path)}: not valid YAML: {exc}"]) from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{_display(path)}: a recipe must be a mapping of keys, got {type(raw).__name__}"])
    lines = _key_lines(root)
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError([f"{_display(path)}:{lines.get('base', '?')}: key base must be a list of recipe paths"])
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _load_file(path.parent / base, provenance, (*chain, path)))
    _drop_replaced_plugins(merged, raw, "", provenance)
    try:
        own = OmegaConf.create(raw)
    except OmegaConfBaseException as exc:
        raise RecipeError([f"{_display(path)}: {exc}"]) from None
    for key in _leaves(raw):
        provenance[key] = f"{_display(path)}:{lines.get(key, '?')}"
    return OmegaConf.merge(merged, own)


def _drop_replaced_plugins(merged: DictConfig, raw: dict[str, Any], prefix: str, provenance: dict[str, str]) -> None:
    """A mapping that names a different plugin (``name:``) replaces the inherited one instead of
    merging into it: the base plugin's arguments would not fit the new plugin."""
    for key, value in raw.items():
        if not isinstance(value, dict) or not isinstance(merged, DictConfig) or key not in merged:
            continue
        inherited = merged[key]
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(inherited, DictConfig) and "name" in value and inherited.get("name") != value["name"]:
            del merged[key]
            for k in [k for k in provenance if k == dotted or k.startswith(dotted + ".")]:
                del provenance[k]
        elif isinstance(inherited, DictConfig):
            _drop_replaced_plugins(inherited, value, dotted, provenance)


def parse_override(text: str) -> tuple[str, Any, bool]:
    """``key=value`` -> (key, YAML-parsed value, False); ``~key`` -> (key, None, True)."""
    if text.startswith("~"):
        key = text[1:].split("=", 1)[0]
        if not key:
            raise RecipeError([f"command line: {text!r}: expected ~KEY"])
        return key, None, True
    if "=" not in text:
        raise RecipeError([f"command line: {text!r}: expected KEY=VALUE or ~KEY"])
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError([f"command line: {text!r}: empty key"])
    try:
        parsed = safe_yaml(value, f"command line: {text}")[0] if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 3e-3 as a string; a command line means the number
    return key, parsed, False


def _interpolations(config: DictConfig) -> dict[str, str]:
    """Keys whose value is exactly ``${other.key}``: an error about them names where ``other.key`` was set."""
    raw = OmegaConf.to_container(config, resolve=False)
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, str):
            match = re.fullmatch(r"\$\{([\w.]+)\}", node.strip())
            if match:
                found[prefix] = match.group(1)

    walk(raw, "")
    return found


#: A node interpolation inside a string: ``${a.b}``, ``${.sibling}``, ``${a[0]}``; a resolver
#: call (``${oc.env:HOME}``) has a colon and reads no key, a nested one (``${oc.select:${a}}``)
#: is matched at its inner ``${a}``.
_REFERENCE = re.compile(r"\$\{([^${}:]+)\}")


def _absolute(reference: str, key: str) -> str:
    """The dotted key a ``${reference}`` written at ``key`` points at (relative ones, ``${.x}``
    or ``${..x}``, count from the container of ``key``; ``[i]`` is ``.i``)."""
    reference = re.sub(r"\[(\w+)\]", r".\1", reference.strip())
    if not reference.startswith("."):
        return reference
    dots = len(reference) - len(reference.lstrip("."))
    parts = key.split(".")[:-dots] if dots <= key.count(".") + 1 else []
    return ".".join([*parts, reference[dots:]]).strip(".")


def _references(config: DictConfig) -> dict[str, list[str]]:
    """Every key whose value is a string with ``${...}`` node interpolations -> the keys they name."""
    raw = OmegaConf.to_container(config, resolve=False)
    found: dict[str, list[str]] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")
        elif isinstance(node, str) and "${" in node:
            names = [_absolute(m, prefix) for m in _REFERENCE.findall(node)]
            if names:
                found[prefix] = names

    walk(raw, "")
    return found


def interpolation_loop(config: DictConfig) -> list[str] | None:
    """The first loop of ``${...}`` interpolations, as the keys around it (``[a.b, a.c, a.b]``),
    or None. Found on the unresolved recipe by walking the references, before OmegaConf resolves
    anything: resolving a loop ends in its multi-line "Recursive interpolation detected" or,
    when something follows the copies key by key, in a ``RecursionError``. A key depends on
    every interpolation at, under or above the key it names (``${a}`` needs ``a.b`` resolved)."""
    references = _references(config)

    def needs(key: str) -> list[str]:
        return [other for name in references[key] for other in references
                if other == name or other.startswith(name + ".") or name.startswith(other + ".")]

    state: dict[str, int] = {}  # 1: on the current path, 2: no loop through it
    path: list[str] = []

    def visit(key: str) -> list[str] | None:
        state[key] = 1
        path.append(key)
        for other in needs(key):
            if state.get(other) == 1:
                return [*path[path.index(other):], other]
            if other not in state:
                loop = visit(other)
                if loop:
                    return loop
        path.pop()
        state[key] = 2
        return None

    for key in references:
        if key not in state:
            loop = visit(key)
            if loop:
                return loop
    return None


def _forget(provenance: dict[str, str], key: str) -> None:
    for stale in [k for k in provenance if k == key or k.startswith(key + ".")]:
        del provenance[stale]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file with its bases and apply command-line overrides.

    Interpolations are resolved; every problem raises ``RecipeError`` naming file and key.
    """
    provenance: dict[str, str] = {}
    path = Path(path)
    config = _load_file(path, provenance, ())
    problems: list[str] = []
    for text in overrides:
        key, value, delete = parse_override(text)
        source = f"command line: {text}"
        if delete:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(config, parent_key) if parent_key else config
            if not isinstance(parent, DictConfig) or leaf not in parent:
                problems.append(f"{source}: key {key} is not in the recipe, nothing to remove")
                continue
            del parent[leaf]
            _forget(provenance, key)
            provenance[key] = source  # a default that now applies was chosen on the command line
            continue
        try:
            OmegaConf.update(config, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            problems.append(f"{source}: cannot set {key}: {exc}")
            continue
        _forget(provenance, key)  # keys under a replaced value no longer come from the file
        for leaf in _leaves(value, key):  # the key itself included
            provenance[leaf] = source
    if problems:
        raise RecipeError(problems)
    recipe = Recipe(path=path, config=config, provenance=provenance, overrides=list(overrides),
                    interpolations=_interpolations(config))
    loop = interpolation_loop(config)
    if loop:
        first = loop[0]
        sources = ", ".join(f"{key} at {provenance.get(key, _display(path))}" for key in dict.fromkeys(loop))
        raise RecipeError([f"{provenance.get(first, _display(path))}: key {first}: its ${{...}} interpolations form a "
                           f"loop, {' -> '.join(loop)} ({sources}): no value can be resolved; set one of them "
                           f"to a value"])
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        message = str(getattr(exc, "msg", None) or exc).splitlines()[0]  # OmegaConf adds full_key/object_type lines
        raise RecipeError([f"{recipe.where(key)}: key {key}: cannot resolve interpolation: {message}"]) from None
    except RecursionError:  # a loop the walk above did not see: still one line, not a traceback
        raise RecipeError([f"{_display(path)}: cannot resolve its ${{...}} interpolations: they refer to each "
                           f"other without end"]) from None
    return recipe


def to_yaml(config: DictConfig | dict) -> str:
    if isinstance(config, dict):
        config = OmegaConf.create(config)
    return OmegaConf.to_yaml(config, resolve=True)
