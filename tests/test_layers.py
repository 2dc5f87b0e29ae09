"""The package's shape, checked statically (no Ray, nothing imported from llmserve_nb):

- the import-linter contracts of pyproject.toml hold (`lint-imports`);
- no import cycle between any two modules, a package's `__init__` and its own children included;
- no module over 450 lines unless the first paragraph of its docstring says why ("Over 450 lines: ...");
- the API key's environment variable is named in one place: `llmserve_nb.config.API_KEY_ENV`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llmserve_nb"
MAX_LINES = 450
LONG_MODULE_REASON = "Over 450 lines:"
API_KEY_VARIABLE = "LLMSERVE_NB_API_KEY"
API_KEY_HOME = "llmserve_nb/config.py"


def _modules() -> dict[str, str]:
    """Every module of the package: repo-relative path -> source."""
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"lint-imports exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


# ---- cycles -------------------------------------------------------------------------------------
def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (first module repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph has ~100 modules, recursion is fine
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(imports[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return [_shortest_cycle(min(group), group, imports) for group in groups]


def _shortest_cycle(start: str, group: set[str], imports: dict[str, set[str]]) -> list[str]:
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for imported in sorted(imports[module] & group):
            if imported == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if imported not in came_from:
                came_from[imported] = module
                queue.append(imported)
    raise AssertionError(f"{start} is in a strongly connected group but on no cycle")


def test_cycle_finder_names_the_shortest_cycle():
    imports = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(imports) == [["a", "b", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    # Every import counts, those inside functions and under TYPE_CHECKING too (as for lint-imports):
    # a cycle is two modules that each need the other, whenever the import runs.
    graph = grimp.build_graph("llmserve_nb", cache_dir=None)
    imports = {m: set(graph.find_modules_directly_imported_by(m)) - {m} for m in graph.modules}
    cycles = _cycles(imports)
    shown = []
    for cycle in cycles:
        steps = []
        for importer, imported in zip(cycle, cycle[1:]):
            lines = sorted({d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)})
            steps.append(f"  {importer} -> {imported} (line {', '.join(map(str, lines))})")
        shown.append("\n".join(steps))
    assert cycles == [], "import cycles:\n" + "\n\n".join(shown)


# ---- size ---------------------------------------------------------------------------------------
def test_no_module_over_450_lines_without_a_reason():
    too_long = {}
    for path, source in _modules().items():
        lines = len(source.splitlines())
        if lines <= MAX_LINES:
            continue
        first_paragraph = (ast.get_docstring(ast.parse(source)) or "").split("\n\n")[0]
        reasons = [line.strip()[len(LONG_MODULE_REASON):].strip() for line in first_paragraph.splitlines()
                   if line.strip().startswith(LONG_MODULE_REASON)]
        if not any(reasons):
            too_long[path] = lines
    assert too_long == {}, (
        f"modules over {MAX_LINES} lines: {too_long}. Split them, or give the reason in the first paragraph of "
        f"the module's docstring, on a line starting with {LONG_MODULE_REASON!r}")


# ---- one name for the API key's variable -------------------------------------------------------
def test_the_api_key_variable_is_named_only_in_config():
    assigned = {}
    for path, source in _modules().items():
        for node in ast.walk(ast.parse(source)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "API_KEY_ENV" for t in targets):
                assigned[path] = ast.unparse(node.value) if node.value is not None else None
    assert assigned == {API_KEY_HOME: repr(API_KEY_VARIABLE)}, "API_KEY_ENV = ... belongs in config.py alone"
    spelled_out = [path for path, source in _modules().items() if API_KEY_VARIABLE in source and path != API_KEY_HOME]
    assert spelled_out == [], f"{API_KEY_VARIABLE!r} spelled out (use llmserve_nb.config.API_KEY_ENV) in {spelled_out}"
