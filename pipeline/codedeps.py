"""The code each stage of the graph runs, derived from the import graph and the method registry.

A stage depends on the project modules its entry modules import, followed transitively through
every ``import`` statement (those inside functions too), and on the package ``__init__`` files
Python runs on the way. One edge is not followed: ``fss/models/methods/__init__.py`` imports every
method module so that each registers itself, but a stage of method M runs only M's module, its
base method's (the registry's ``base``, recursively) and what they import. Another method's
module can register names there, never change M's outputs, so editing APANet does not retrain
CANet. Stages that read the whole registry (the aggregate's method names and bases) take every
method module and the registration list itself.

``dvc.yaml`` lists exactly these files (``fss graph`` writes it, ``fss graph --check`` and
``tests/pipeline/test_graph.py`` compare), and a run's code digest (``pipeline.runs.input_digests``)
hashes the same files, so the two agree on what counts as a code change.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import fss
from fss.models.registry import get_method, list_methods

REPO = Path(fss.__file__).resolve().parent.parent
PACKAGES = ("fss", "pipeline")
#: the registration list: imports every method module, whose own stage each one is
METHODS_PACKAGE = "fss.models.methods"

#: the modules each kind of stage starts from (its command's module and the fold runner)
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "prepare": ("pipeline.prepare",),
    "pretrain": ("pipeline.pretrain",),
    "train": ("pipeline.train_cmd", "pipeline.parallel"),
    "evaluate": ("pipeline.evaluate", "pipeline.parallel"),
    "aggregate": ("pipeline.aggregate",),
    "sweep": ("pipeline.sweep.run", "pipeline.parallel"),
    "sweep_report": ("pipeline.sweep.report",),
}

#: files that run in every stage but cannot change what a stage writes (never deps)
NO_OUTPUT_EFFECT = frozenset({
    "fss/errors.py",  # message classes
    "fss/atomic.py",  # how a file is written (temp file + rename), not what
    "pipeline/console.py",  # progress bars and printing
    "pipeline/cli.py",  # dispatch to the command
})


@lru_cache(maxsize=None)
def project_modules() -> dict[str, Path]:
    """Every module of the fss and pipeline packages: dotted name -> file."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _with_packages(name: str) -> list[str]:
    """``a.b.c`` and the packages Python initialises to import it: ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@lru_cache(maxsize=None)
def imports_of(module: str) -> frozenset[str]:
    """The project modules that ``module`` imports anywhere in its file (packages included)."""
    modules = project_modules()
    tree = ast.parse(modules[module].read_text(), filename=str(modules[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.update(n for n in _with_packages(name) if n in modules)
    found.discard(module)
    return frozenset(found)


def method_modules(method: str) -> list[str]:
    """The module registering ``method`` and those of its bases (``apanet`` -> apanet, pfenet)."""
    out = []
    name: str | None = method
    while name is not None:
        spec = get_method(name)
        out.append(spec.builder.__module__)
        name = spec.base
    return out


def closure(entries: tuple[str, ...], methods: tuple[str, ...]) -> list[str]:
    """Repository-relative files of ``entries``, ``methods``' modules and all they import."""
    modules = project_modules()
    every_method = set(methods) == set(list_methods())
    todo = [*entries, *(m for method in methods for m in method_modules(method))]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module == METHODS_PACKAGE and not every_method:
            continue  # the registration list: only the stage's own methods are followed
        todo.extend(imports_of(module))
    if not every_method:
        seen.discard(METHODS_PACKAGE)
    files = {modules[m].relative_to(REPO).as_posix() for m in seen}
    return sorted(files - NO_OUTPUT_EFFECT)


def stage_code(kind: str, methods: tuple[str, ...] = ()) -> list[str]:
    """The code files a stage of ``kind`` (a key of :data:`STAGE_ENTRIES`) for ``methods`` runs."""
    return closure(STAGE_ENTRIES[kind], tuple(methods))


def train_code(method: str) -> list[str]:
    """What one training run of ``method`` runs: the train stage's code (a run's code digest)."""
    return stage_code("train", (method,))
