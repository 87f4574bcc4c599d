"""vlmask's modules form layers, each importing only from its own layer or below, without a
cycle, and never from ``vlmask_plugins`` (CONTRIBUTING.md, "Layers").

Every import statement of every module is read with ``ast``: at module level, inside
functions and classes, and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "vlmask"

#: Bottom to top. A module may import modules of its own layer or of a layer below.
LAYERS: list[tuple[str, set[str]]] = [
    ("types, provenance, schedules, small io", {"vlmask", "types", "provenance", "schedules", "paths", "metrics",
                                                "diagnostics", "statistics", "pictures", "io", "launch", "preemption"}),
    ("config, registry, hooks, plugins, schema, kinds", {"config", "registry", "hookspecs", "plugins", "schema", "sections", "kinds", "features", "stages",
                                                         "records"}),
    ("checkpoint, parallel, data loading, engine-owned caches, run directories",
     {"checkpoint", "sharded", "parallel", "data_loading", "data_requirements", "caches", "rundir"}),
    ("step, build", {"step", "build"}),
    ("engine, runs", {"engine", "runs"}),
    ("evaluate, finetune, bench, flops, rehearsal, show", {"evaluate", "finetune", "bench", "flops", "rehearsal", "show"}),
    ("compare, report", {"compare", "report"}),
    ("command line", {"cli", "__main__"}),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    return "vlmask" if path.name == "__init__.py" else path.stem


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, wherever it stands."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "vlmask":  # ``from vlmask import checkpoint`` names a module
                found += [(node.lineno, f"vlmask.{a.name}") for a in node.names if (PACKAGE / f"{a.name}.py").is_file()]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, f"vlmask.{node.module or ''}".rstrip(".")))
    return found


def vlmask_edges(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """module -> the vlmask modules it imports, and every problem found on the way."""
    edges: dict[str, set[str]] = {}
    problems: list[str] = []
    for path in sorted(package.glob("*.py")):
        name = module_name(path)
        if name not in LAYER_OF:
            problems.append(f"{path.name}: not in the table of layers (tests/vlmask/test_layers.py LAYERS)")
            continue
        edges[name] = set()
        for line, imported in imports_of(path):
            root = imported.split(".")[0]
            if root == "vlmask_plugins":
                problems.append(f"{path.name}:{line}: imports {imported} (vlmask never imports its plugins)")
            if root != "vlmask":
                continue
            target = imported.split(".")[1] if "." in imported else "vlmask"
            if target == name:
                continue
            edges[name].add(target)
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[name]:
                problems.append(f"{path.name}:{line}: imports vlmask.{target} from a higher layer "
                                f"({LAYERS[LAYER_OF[target]][0]} above {LAYERS[LAYER_OF[name]][0]})")
    return edges, problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_import_stays_in_its_layer_or_below_and_none_reaches_the_plugins():
    _, problems = vlmask_edges(PACKAGE)
    assert problems == [], "\n".join(problems)


def test_the_modules_of_vlmask_form_no_cycle():
    edges, _ = vlmask_edges(PACKAGE)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


@pytest.mark.parametrize("line", [
    "    from vlmask.engine import Trainer\n",  # upward, inside a function
    "if TYPE_CHECKING:\n    import vlmask_plugins.encoders.vit\n",  # the plugins, under TYPE_CHECKING
])
def test_an_upward_or_plugin_import_anywhere_is_found(tmp_path: Path, line: str):
    """A scratch copy of the package with one bad import added to ``schema.py`` fails the check."""
    scratch = tmp_path / "vlmask"
    scratch.mkdir()
    for path in PACKAGE.glob("*.py"):
        (scratch / path.name).write_text(path.read_text())
    source = (scratch / "schema.py").read_text()
    bad = "\n\ndef _scratch():\n" + line if line.startswith("    ") else "\n\nfrom typing import TYPE_CHECKING\n" + line
    (scratch / "schema.py").write_text(source + bad)
    _, problems = vlmask_edges(scratch)
    assert len(problems) == 1 and problems[0].startswith("schema.py:"), problems


#: The modules that may touch ``vlmask.engine.Trainer``: the loop's own and the command line that runs it.
#: Everything else that steps a model (bench, FLOP counts, the rehearsal) takes a ``vlmask.step.TrainStep``.
TRAINER_USERS = {"engine", "cli"}


def trainer_uses(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every import of the name ``Trainer``, ``engine.Trainer`` or a bare
    ``Trainer`` in a module, wherever it stands."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and any(a.name == "Trainer" for a in node.names):
            found.append((node.lineno, f"imports Trainer from {node.module}"))
        elif isinstance(node, ast.Attribute) and node.attr == "Trainer":
            found.append((node.lineno, "uses .Trainer"))
        elif isinstance(node, ast.Name) and node.id == "Trainer":
            found.append((node.lineno, "uses Trainer"))
    return found


def test_only_the_engine_and_the_command_line_touch_the_trainer():
    problems = [f"{path.name}:{line}: {what}" for path in sorted(PACKAGE.glob("*.py"))
                if module_name(path) not in TRAINER_USERS for line, what in trainer_uses(path)]
    assert problems == [], "\n".join(problems)


def test_a_trainer_used_elsewhere_is_found(tmp_path: Path):
    scratch = tmp_path / "bench.py"
    scratch.write_text("def f():\n    from vlmask.engine import Trainer\n    return Trainer\n")
    assert [line for line, _ in trainer_uses(scratch)] == [2, 3]


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_blocking_the_builtin_plugin_removes_it_and_nothing_of_vlmask_imports_it(tmp_path: Path):
    """With ``VLMASK_BLOCK_PLUGINS=builtin`` no built-in plugin is listed, its commands are gone,
    and after building the CLI, listing plugins and validating a recipe no ``vlmask_plugins``
    module was imported."""
    script = (
        "import json, sys\n"
        "from vlmask import cli\n"
        "from vlmask.plugins import default_plugins\n"
        "p = cli.parser()\n"
        "plugins = default_plugins()\n"
        "code = cli.main(['plugins'])\n"
        "import contextlib, io\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        "    try:\n"
        "        cli.parser().parse_args(['data', 'synth', '--out', 'x'])\n"
        "    except SystemExit as exit:\n"
        "        synth = exit.code\n"
        "print(json.dumps({'entries': [e.name for e in plugins.registry.entries()], 'blocked': plugins.blocked,\n"
        "    'code': code, 'synth': synth, 'loaded': sorted(m for m in sys.modules if m.startswith('vlmask_plugins'))}))\n"
    )
    env = {**os.environ, "VLMASK_BLOCK_PLUGINS": "builtin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entries"] == [] and "builtin" in result["blocked"]
    assert result["code"] == 0
    assert result["synth"] == 2, "vlmask data synth comes from the built-in plugin: blocked, it is an unknown command"
    assert result["loaded"] == []
