"""The package's layering: the library never reaches up into the command line or the benchmarks,
its modules import one another without cycles, and ``import rdlm`` stays light (training, data and
checkpoint dependencies load when first used)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rdlm

PACKAGE = Path(rdlm.__file__).parent
TOP = ("cli", "bench")  # what sits above the library
# The command-line entry point (``python -m rdlm``) is a caller of rdlm.cli, not library code.
ENTRY_POINTS = ("__main__.py",)
HEAVY = ("grain", "orbax", "tensorboardX", "matplotlib", "pyarrow")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The dotted names ``path`` imports from rdlm, at any depth (function-level imports
    included), and every ``importlib.import_module("rdlm.…")`` with a literal name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "rdlm.data.tasks" (a module) or "rdlm.data.load_tokenizer" (a name in rdlm.data)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return {n for n in names if n == "rdlm" or n.startswith("rdlm.")}


def library_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).parts[0] not in TOP and p.name not in ENTRY_POINTS]


def test_the_library_never_imports_the_cli_or_the_benchmarks():
    offenders = {}
    for path in library_files():
        upward = sorted(n for n in imported_modules(path)
                        if n.split(".")[1:2] and n.split(".")[1] in TOP)
        if upward:
            offenders[str(path.relative_to(PACKAGE.parent))] = upward
    assert not offenders, f"library modules import rdlm.cli / rdlm.bench: {offenders}"


def test_modules_import_each_other_without_cycles():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # ``from rdlm.data import tasks`` names a module; ``from rdlm.data import load_tokenizer`` the
    # package: an edge goes to the most specific module that exists.
    graph = {name: {n if n in files else n.rsplit(".", 1)[0]
                    for n in imported_modules(path)} & set(files) - {name}
             for name, path in files.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_import_rdlm_loads_no_training_data_or_checkpoint_dependency():
    code = ("import sys, rdlm; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
