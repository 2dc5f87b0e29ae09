"""Run the notebooks headless (papermill), read back their results, and keep them clean.

Notebooks publish what tests and pipelines check as one `application/json` output in a cell
tagged `results` (`emit_results`); `read_results` gets it back from an executed copy with nbformat,
so nobody parses printed tables. Executed copies go under the git-ignored `runs/<timestamp>/`.
The notebooks themselves are found in ./notebooks, the checkout this package runs from, or the copy
the wheel installs under `sys.prefix/share/llmserve-nb/notebooks` (`notebook_dir`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_TAG",
    "check_clean",
    "emit_results",
    "notebook_dir",
    "plot_batch_sizes",
    "read_results",
    "run_notebook",
    "run_notebooks",
]

RESULTS_TAG = "results"
# Where the wheel installs the notebooks, under sys.prefix.
SHARED_NOTEBOOKS = Path("share") / "llmserve-nb" / "notebooks"
# The main job: what `make demo` runs, in order. Each notebook starts and stops its own Ray (an embedded one;
# 06 a head with the autoscaler, on its own ports).
DEFAULT_NOTEBOOKS = ("00_quickstart", "01_connect_cluster", "02_tune_autoscaling", "03_benchmark", "04_reliability", "05_rollout",
                     "06_cluster_autoscaling", "07_capacity_plan")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def emit_results(data: dict[str, Any]) -> None:
    """Display `data` as an application/json output (call it in the cell tagged `results`)."""
    from IPython.display import display

    data = json.loads(json.dumps(data, default=_jsonable))
    # text/plain as well: nbconvert's HTML export has no renderer for application/json and warns about every
    # output that offers nothing else.
    display({"application/json": data, "text/plain": json.dumps(data, indent=1)}, raw=True)


def plot_batch_sizes(histogram: dict[str, int], max_batch_size: int | None = None, ax=None):
    """Bar chart of how many batches of each size a replica formed (from `AppHandle.burst`/`stats`)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3))[1]
    sizes = sorted(int(k) for k in histogram)
    ax.bar([str(s) for s in sizes], [histogram[str(s)] for s in sizes], color="tab:blue")
    ax.set_xlabel("batch size formed")
    ax.set_ylabel("batches")
    title = "dynamic batching"
    ax.set_title(f"{title} (max_batch_size={max_batch_size})" if max_batch_size else title)
    return ax


def read_results(path: str | Path, tag: str = RESULTS_TAG) -> dict[str, Any]:
    """Merge the application/json outputs of the cells tagged `tag` in an executed notebook."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    found: dict[str, Any] = {}
    tagged = [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
    if not tagged:
        raise ValueError(f"{path}: no code cell tagged {tag!r}")
    for cell in tagged:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise RuntimeError(f"{path}: the {tag!r} cell failed: {out.get('ename')}: {out.get('evalue')}")
            data = out.get("data", {}).get("application/json")
            if isinstance(data, dict):
                found.update(data)
    if not found:
        raise ValueError(f"{path}: the cells tagged {tag!r} have no application/json output (not executed?)")
    return found


def unreadable_parameters(source: str) -> list[str]:
    """Names a parameters cell assigns that papermill's inference cannot read (it skips any line with a
    second `=`, in a comment too): `papermill --help-notebook` leaves them out, and every run passing them
    warns "Passed unknown parameter" although they are applied."""
    import ast

    from papermill.translators import PythonTranslator

    assigned = [t.id for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
    read = {p.name for p in PythonTranslator.inspect({"source": source})}
    return [name for name in assigned if name not in read]


def notebook_dir(folder: str | Path | None = None) -> Path:
    """The folder holding the notebooks: `folder` when given, else the first of ./notebooks, the checkout
    this package runs from, and the wheel's copy under sys.prefix that has the quickstart in it."""
    if folder is not None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"notebook folder {folder} does not exist")
        return Path(folder)
    candidates = [Path.cwd() / "notebooks", Path(__file__).resolve().parent.parent / "notebooks",
                  Path(sys.prefix) / SHARED_NOTEBOOKS]
    for candidate in candidates:
        if (candidate / f"{DEFAULT_NOTEBOOKS[0]}.ipynb").is_file():
            return candidate
    raise FileNotFoundError(f"no notebooks found in {', '.join(map(str, candidates))}; name their folder "
                            "(--notebooks DIR, e.g. a clone's notebooks/)")


def check_clean(paths: list[Path] | None = None) -> list[str]:
    """Problems that must not be committed: outputs, execution counts, no `parameters` cell first, parameters
    papermill cannot read."""
    import nbformat

    problems = []
    for path in paths or sorted(notebook_dir().glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code or "parameters" not in code[0].metadata.get("tags", []):
            problems.append(f"{path.name}: the first code cell must be tagged 'parameters' (papermill)")
        elif hidden := unreadable_parameters(code[0].source):
            problems.append(f"{path.name}: papermill cannot read the parameters {', '.join(hidden)}: a line of the "
                            "parameters cell may hold one '=' only, its comment included")
        for i, c in enumerate(code):
            if c.get("outputs") or c.get("execution_count") is not None:
                problems.append(f"{path.name}: code cell {i} has outputs/execution count; clear them before committing")
        if nb.metadata.get("widgets"):
            problems.append(f"{path.name}: saved widget state in metadata; clear it")
    return problems


def _kernel_config():
    from traitlets.config import Config

    # Over TCP every kernel start warns that its traffic is unencrypted ("Kernel is running over TCP without
    # encryption"); unix sockets (POSIX only) keep it on this machine, with nothing to warn about.
    return Config({"KernelManager": {"transport": "ipc"}}) if os.name == "posix" else Config()


def run_notebook(
    name: str | Path, out_dir: str | Path, parameters: dict[str, Any] | None = None, *,
    kernel: str = "python3", html: bool = True, timeout_s: int = 1800, notebooks: str | Path | None = None,
) -> Path:
    """Execute one notebook with papermill into `out_dir`; returns the executed copy's path. `name` is a
    path, or a name looked up in `notebook_dir(notebooks)`."""
    import papermill as pm

    src = Path(name)
    if not src.suffix:
        src = notebook_dir(notebooks) / f"{name}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"notebook {src} not found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.name
    pm.execute_notebook(
        # Run next to the executed copy, so files a notebook writes (bench reports) land in runs/<ts>/ too.
        str(src), str(out), parameters=parameters or {}, kernel_name=kernel, cwd=str(out_dir),
        execution_timeout=timeout_s, progress_bar=False, log_output=False, config=_kernel_config(),
    )
    if html:
        _export_html(out)
    return out


def _export_html(path: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(path), as_version=4))
    html_path = path.with_suffix(".html")
    html_path.write_text(body)
    return html_path


def run_notebooks(
    names: list[str] | None = None, out_root: str | Path = "runs", parameters: dict[str, Any] | None = None,
    *, kernel: str = "python3", html: bool = True, notebooks: str | Path | None = None,
) -> Path:
    """Run the notebooks in order into `out_root/<timestamp>/`; stops at the first failure."""
    out_dir = Path(out_root) / time.strftime("%Y%m%d-%H%M%S")
    folder = notebook_dir(notebooks)
    print(f"notebooks from {folder}/", flush=True)
    for name in names or DEFAULT_NOTEBOOKS:
        t0 = time.monotonic()
        print(f"running {name} ...", flush=True)
        try:
            out = run_notebook(name, out_dir, parameters, kernel=kernel, html=html, notebooks=folder)
        except Exception as e:
            # papermill has already saved the partially executed copy, which shows the failing cell.
            raise RuntimeError(f"{name} failed after {time.monotonic() - t0:.0f}s; see {out_dir / Path(name).name}.ipynb\n{e}") from None
        print(f"  done in {time.monotonic() - t0:.0f}s -> {out}", flush=True)
    return out_dir


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("run-notebooks", help="execute the notebooks headless with papermill into runs/<timestamp>/")
    p.add_argument("names", nargs="*", help=f"notebook names (default: {' '.join(DEFAULT_NOTEBOOKS)})")
    p.add_argument("--out", default="runs", help="parent folder of the timestamped output folder")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=JSON",
                   help="papermill parameter override, value parsed as JSON when possible (repeatable)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export")
    p.add_argument("--notebooks", metavar="DIR", type=Path,
                   help=f"the notebooks' folder (default: ./notebooks, else the installed copy in "
                        f"{Path(sys.prefix) / SHARED_NOTEBOOKS})")
    p.set_defaults(func=_cli_run, parser=p)
    c = subparsers.add_parser("check-notebooks", help="fail if a committed notebook has outputs or lacks a parameters cell")
    c.add_argument("paths", nargs="*", type=Path)
    c.set_defaults(func=_cli_check)


def _parse_params(items: list[str], parser) -> dict[str, Any]:
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            parser.error(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _cli_run(args) -> int:
    try:
        out_dir = run_notebooks(args.names or None, args.out, _parse_params(args.param, args.parser),
                                html=not args.no_html, notebooks=args.notebooks)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"executed notebooks and HTML exports are in {out_dir}/")
    return 0


def _cli_check(args) -> int:
    problems = check_clean(args.paths or None)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0
