"""Structural checks on the packages `flows`, `tasks` and `ray_jobs`, whatever folders their modules live in.

Modules are found by walking the package folders (every `*.py`), never listed by hand, so that moving a
module around needs no change here. Each checker takes its package roots as arguments, and a companion
test runs it on a throwaway package in `tmp_path` to prove that it can fail.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = [REPO / name for name in ("flows", "tasks", "ray_jobs")]
MAX_LINES = 320
REPORT = "IMPORT-CHECK-REPORT "

# Run in a fresh interpreter: argv[1] is JSON {"roots": [...], "path": [...], "modules": [...]}.
CHECKER = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
ROOTS = tuple(os.path.join(os.path.realpath(r), "") for r in cfg["roots"])
EVENTS = {"open", "os.scandir", "os.listdir", "glob.glob", "subprocess.Popen", "os.system", "os.fork",
          "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.kill", "socket.connect", "socket.bind",
          "socket.getaddrinfo", "os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.symlink",
          "os.link", "os.chmod", "os.utime", "http.client.connect", "urllib.Request", "sqlite3.connect"}
PREFECT = os.sep + "prefect" + os.sep
work, failures, state = [], [], {"busy": False, "on": True}

def plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)[:200]

def ours(filename):
    return os.path.realpath(filename).startswith(ROOTS) if filename.endswith(".py") else False

def hook(event, args):
    if state["busy"] or not state["on"] or not (event in EVENTS or event.startswith("shutil.")):
        return
    state["busy"] = True
    try:
        frame, via_prefect = sys._getframe(1), False
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith("<frozen importlib") or "importlib/" in filename:
                return  # the import machinery reading or writing a module: not the module's own work
            via_prefect = via_prefect or PREFECT in filename
            if frame.f_code.co_name == "<module>":
                if via_prefect and event == "open" and os.path.realpath(str(args[0])) == os.path.realpath(filename):
                    return  # Prefect's @task/@flow read the decorated module's own source (cache key, version)
                if ours(filename):
                    entry = {"module": frame.f_globals.get("__name__"), "event": event,
                             "args": [plain(a) for a in args]}
                    if entry not in work:
                        work.append(entry)
                return
            frame = frame.f_back
    finally:
        state["busy"] = False

sys.addaudithook(hook)
sys.path[:0] = cfg["path"]
real_stdout, sys.stdout = sys.stdout, sys.stderr
import importlib
for name in cfg["modules"]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failures.append({"module": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
state["on"] = False
real_stdout.write("\nIMPORT-CHECK-REPORT " + json.dumps({"work": work, "failures": failures}) + "\n")
real_stdout.flush()
'''


def module_files(roots: Iterable[Path]) -> dict[str, Path]:
    """Every module under the package roots by dotted name (a package is its `__init__.py`)."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def run_import_check(roots: list[Path], sys_path: list[Path]) -> dict[str, list[dict]]:
    """Import every module in a fresh interpreter under an audit hook; the work each did, and the failures."""
    cfg = {"roots": [str(r) for r in roots], "path": [str(p) for p in sys_path],
           "modules": sorted(module_files(roots))}
    proc = subprocess.run([sys.executable, "-c", CHECKER, json.dumps(cfg)], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    reports = [line for line in proc.stdout.splitlines() if line.startswith(REPORT)]
    assert proc.returncode == 0 and reports, f"checker crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(reports[-1][len(REPORT):])


def test_importing_any_module_does_no_work() -> None:
    """Importing a module must not touch files, processes or the network: that belongs in functions."""
    report = run_import_check(ROOTS, [])
    failures = "\n".join(f"{f['module']}: {f['error']}" for f in report["failures"])
    work = "\n".join(map(json.dumps, report["work"]))
    assert not (failures or work), f"modules that fail to import:\n{failures}\n\nwork done at import time:\n{work}"


def test_the_import_check_catches_work_at_import(tmp_path: Path) -> None:
    """The audit hook sees module-level file reads, ignores a library's own import work, and reports failures."""
    pkg, lib = tmp_path / "fakepkg", tmp_path / "fakelib"
    pkg.mkdir()
    lib.mkdir()
    (lib / "__init__.py").write_text("DATA = open(__file__).read()\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("import hashlib\nfrom pathlib import Path\n"
                                "DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()\n")
    (pkg / "clean.py").write_text("import fakelib\nfrom pathlib import Path\n\n\n"
                                  "def digest() -> bytes:\n    return Path(__file__).read_bytes()\n")
    (pkg / "broken.py").write_text("raise RuntimeError('boom')\n")
    report = run_import_check([pkg], [tmp_path])
    assert {(w["module"], w["event"]) for w in report["work"]} == {("fakepkg.mod", "open")}, report
    assert [f["module"] for f in report["failures"]] == ["fakepkg.broken"], report


def imported_names(path: Path, module: str) -> list[tuple[str, str]]:
    """(name, fallback) for every import of a module, in functions and `if TYPE_CHECKING:` blocks too.

    `import a.b` gives ("a.b", "a.b"); `from a import b` gives ("a.b", "a"), since `b` may be a module or
    just a name in `a`; relative imports are made absolute; `importlib.import_module("x")` counts too.
    """
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts[: len(parts) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [(base if alias.name == "*" else f"{base}.{alias.name}", base) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.args[0].value))
    return [(name, fallback) for name, fallback in found if name and not name.startswith(".")]


def import_graph(roots: list[Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's `__init__` only where the import names it)."""
    files = module_files(roots)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = {name if name in files else fallback for name, fallback in imported_names(path, module)}
        graph[module] = {target for target in targets if target in files}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> a) per strongly connected component of several modules or a self-import (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1 or node in graph[node]:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components]


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest way from the first module of a component back to itself, breadth first."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while True:
        for node in frontier:
            if start in graph[node]:
                return paths[node] + [start]
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    following.append(succ)
        frontier = following


def test_the_import_graph_has_no_cycle() -> None:
    """A cycle makes import order matter and hides which layer depends on which."""
    cycles = find_cycles(import_graph(ROOTS))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """Relative, `TYPE_CHECKING` and function-level imports all make edges; a self-import is a cycle too."""
    pkg = tmp_path / "cyc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cyc.c\n")
    (pkg / "c.py").write_text("def f() -> None:\n    from cyc.a import X\n")
    (pkg / "d.py").write_text("import cyc.a\nfrom cyc import sub\n")
    (pkg / "e.py").write_text("from cyc.e import Y\n")
    cycles = sorted(find_cycles(import_graph([pkg])))
    assert cycles == [["cyc.a", "cyc.sub.b", "cyc.c", "cyc.a"], ["cyc.e", "cyc.e"]]


def test_every_project_import_names_a_module() -> None:
    """An import of a moved or deleted module (even inside a function) would add no edge to the graph above."""
    files = module_files(ROOTS)
    ours = {root.name for root in ROOTS}
    dangling = [f"{module} imports {missing}"
                for module, path in files.items()
                for missing in sorted({fallback for name, fallback in imported_names(path, module)
                                       if name.split(".")[0] in ours and name not in files and fallback not in files})]
    assert not dangling, "imports of modules that do not exist:\n" + "\n".join(dangling)


def test_layers_import_one_way() -> None:
    """`ray_jobs` runs on Ray workers without Prefect; `tasks` are reused by flows, never the other way."""
    forbidden = {"ray_jobs": {"tasks", "flows", "prefect"}, "tasks": {"flows"}}
    offenders = [f"{module} imports {name}"
                 for module, path in module_files(ROOTS).items()
                 for name in sorted({name for name, _ in imported_names(path, module)})
                 if name.split(".")[0] in forbidden.get(module.split(".")[0], set())]
    assert not offenders, "imports against the layering:\n" + "\n".join(offenders)


def test_no_module_is_too_long() -> None:
    """A module past a few hundred lines does more than one thing; split it."""
    lengths = {module: len(path.read_text().splitlines()) for module, path in module_files(ROOTS).items()}
    offenders = sorted(((n, m) for m, n in lengths.items() if n > MAX_LINES), reverse=True)
    assert not offenders, f"modules over {MAX_LINES} lines:\n" + "\n".join(f"{m}: {n}" for n, m in offenders)
