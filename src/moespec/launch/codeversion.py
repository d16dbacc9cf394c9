"""Code versions: which code an artifact was made by, so that a task is done only when its artifact
could have been made by the code that would run it now.

A stage's code version is a hash of the code that computes its results: the stage's module and
every moespec module it imports, directly or through others (``moespec.geometry``,
``moespec.models``, ``moespec.artifacts``...), each parsed and hashed without its comments,
docstrings and layout, so that rewording a comment or reformatting changes nothing while any
change to what runs does. A task's code version chains its stage's code version with those of the
tasks it reads, so an artifact made from an input that was re-made by changed code is stale too.

The code version is recorded in every artifact (root attributes ``code_version`` and
``stage_code``) and compared by the done check; it is deliberately not part of the uid. The uid
names a question (a configuration and its inputs): keeping it stable keeps artifact folders,
submission records, downstream uids and synced copies in place, and lets ``moespec plan`` say
"stale: the train code changed" about the existing artifact rather than silently planning a new
folder beside an old one that still looks current. Re-running a stale task replaces its artifact.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

#: Modules that never compute results (the orchestration around stages, the package's version
#: string): changing them does not make artifacts stale. Analysis code a stage imports (ablation
#: metrics) does compute results and counts.
_EXCLUDED = ("moespec.launch", "moespec.cli", "moespec.sync")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _source_file(module: str) -> Path | None:
    """The file of a moespec module, found without importing anything (None: not a module, or excluded)."""
    if module == "moespec" or any(module == prefix or module.startswith(prefix + ".") for prefix in _EXCLUDED):
        return None
    relative = Path(*module.split(".")[1:])
    for path in (_PACKAGE_DIR / relative.with_suffix(".py"), _PACKAGE_DIR / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """moespec modules named by the import statements anywhere in ``tree`` (functions included)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name == "moespec" or name.startswith("moespec.")}


def _resolved(names: set[str]) -> set[str]:
    """``from pkg import name`` where ``name`` is no module: every module of ``pkg``.

    Packages such as ``moespec.geometry`` export names lazily (``__getattr__`` importing the
    module that defines them), which no import statement shows; counting the whole package errs
    on the side of calling an artifact stale.
    """
    found = set()
    for name in names:
        if _source_file(name) is not None:
            found.add(name)
            continue
        package, _, _ = name.rpartition(".")
        init = _source_file(package) if package else None
        if init is not None and init.name == "__init__.py":
            found.update(f"{package}.{p.stem}" for p in init.parent.glob("*.py") if p.stem != "__init__")
    return found


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _module_code(module: str) -> tuple[str, frozenset[str]] | None:
    """The hash of one module's normalised code and the moespec modules it imports (None: no such file)."""
    path = _source_file(module)
    if path is None:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imports = set(_resolved(_imported_modules(tree, module, path.name == "__init__.py")))
    if path.name == "__init__.py" and module.startswith("moespec.stages."):
        # A stage package may import its modules by name at run time (ablate: one per source).
        imports.update(f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
    imports = frozenset(imports)
    return hashlib.sha256(ast.dump(_without_docstrings(tree)).encode("utf-8")).hexdigest(), imports


def module_closure(module: str) -> tuple[tuple[str, str], ...]:
    """``(module, hash of its normalised code)`` for ``module`` and every moespec module it imports."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        code = None if name in seen else _module_code(name)
        if code is not None:
            seen[name] = code[0]
            todo += sorted(code[1])
    return tuple(sorted(seen.items()))


@functools.lru_cache(maxsize=None)
def stage_code_version(stage: str) -> str:
    """12 hex digits naming the code of one stage (its module and the moespec modules it imports)."""
    payload = "\n".join(f"{name} {digest}" for name, digest in module_closure(f"moespec.stages.{stage}"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def task_code_version(stage_code: str, input_versions: dict[str, str]) -> str:
    """A task's code version: its stage's, chained with the code versions of the tasks it reads."""
    payload = stage_code + "".join(f"\n{name} {version}" for name, version in sorted(input_versions.items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
