"""No secret in what the project writes or commits.

Secrets in use: the test API key (conftest), the API key in the environment now (the variable that
`config.API_KEY_ENV` names), and the Ray auth token (`llmserve_nb.cluster.read_ray_token()`), each also
looked for base64-encoded (as a Secret's `data:` would hold it). Scanned:

- every notebook (and its HTML export) executed in this pytest session: the notebook tests write
  them under the session's base temp dir, and this module runs after them (tests/test_notebook_*.py
  sort before it), plus everything under `runs/` (`make demo`, `llmserve-nb run-notebooks`);
- every committed file (`git ls-files`), except where the test key is defined (conftest.py): for the
  same values, and for Kubernetes Secrets with literal data (`data:`/`stringData:` in a manifest, a
  kustomize `secretGenerator` with `literals:` or with an `envs:`/`files:` source that is committed).

The scanner is tested too: a secret planted in a temporary notebook's output is found.
"""
from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import API_KEY

REPO = Path(__file__).resolve().parent.parent
SCANNED_SUFFIXES = {".ipynb", ".html", ".json", ".csv", ".txt", ".log", ".md", ".yaml", ".yml", ".env", ".py", ""}
MAX_BYTES = 50 * 2**20
# Where the test key is defined on purpose (a throwaway value for the test cluster).
KEY_DEFINED_IN = {"tests/conftest.py"}


def secrets_in_use() -> dict[str, str]:
    from llmserve_nb.cluster import read_ray_token
    from llmserve_nb.config import API_KEY_ENV

    found = {"test API key (conftest.API_KEY)": API_KEY}
    if os.environ.get(API_KEY_ENV):
        found[f"${API_KEY_ENV}"] = os.environ[API_KEY_ENV]
    token = read_ray_token()
    if token:
        found["Ray auth token"] = token
    return {name: value for name, value in found.items() if len(value) >= 8}


def _needles(secrets: dict[str, str]) -> list[tuple[str, str]]:
    needles = []
    for name, value in secrets.items():
        needles.append((name, value))
        needles.append((f"{name}, base64", base64.b64encode(value.encode()).decode().rstrip("=")))
    return needles


def scan_files(paths: list[Path], secrets: dict[str, str], root: Path | None = None) -> list[str]:
    """`path: what` for each file that contains a secret's value (plain or base64)."""
    needles = _needles(secrets)
    hits = []
    for path in paths:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for name, needle in needles:
            if needle in text:
                shown = path.relative_to(root) if root and path.is_relative_to(root) else path
                hits.append(f"{shown}: contains the {name}")
    return hits


def literal_k8s_secrets(paths: list[Path], committed: set[str], root: Path) -> list[str]:
    """Kubernetes Secrets whose values are committed: manifests with data/stringData, kustomize
    secretGenerators with literals or with env/file sources that are themselves committed."""
    problems = []
    for path in paths:
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                name = (doc.get("metadata") or {}).get("name")
                problems.append(f"{rel}: Secret {name!r} has literal data/stringData")
            for gen in doc.get("secretGenerator") or []:
                if gen.get("literals"):
                    problems.append(f"{rel}: secretGenerator {gen.get('name')!r} has literals")
                for src in (gen.get("envs") or []) + (gen.get("files") or []) + ([gen["env"]] if gen.get("env") else []):
                    src = str(src).split("=", 1)[-1]  # files: [key=path]
                    src_rel = (path.parent / src).resolve()
                    if src_rel.is_relative_to(root) and str(src_rel.relative_to(root)) in committed:
                        problems.append(f"{rel}: secretGenerator {gen.get('name')!r} reads committed file {src}")
    return problems


def _committed() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [p for p in out.split("\0") if p]


def _executed_outputs(tmp_path_factory) -> list[Path]:
    roots = [tmp_path_factory.getbasetemp(), REPO / "runs"]
    return [p for root in roots if root.is_dir() for p in root.rglob("*")
            if p.is_file() and p.suffix in SCANNED_SUFFIXES]


# ---- the scanner scans -----------------------------------------------------------------------------
def _notebook(path: Path, output_text: str) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(token)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output_text)]
    nb.cells = [cell]
    nbformat.write(nb, str(path))
    return path


def test_the_scanner_finds_a_secret_planted_in_a_notebook_output(tmp_path):
    secrets = {"planted key": "sk-planted-0123456789abcdef"}
    leaky = _notebook(tmp_path / "leaky.ipynb", "Authorization: Bearer sk-planted-0123456789abcdef\n")
    encoded = base64.b64encode(b"sk-planted-0123456789abcdef").decode()
    leaky_b64 = _notebook(tmp_path / "leaky_b64.ipynb", f"api-key: {encoded}\n")
    clean = _notebook(tmp_path / "clean.ipynb", "Authorization: Bearer <redacted>\n")
    hits = scan_files([leaky, leaky_b64, clean], secrets, tmp_path)
    assert hits == ["leaky.ipynb: contains the planted key", "leaky_b64.ipynb: contains the planted key, base64"]


def test_the_scanner_finds_literal_kubernetes_secrets(tmp_path):
    (tmp_path / "secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: leaked}\nstringData: {api-key: hunter2hunter2}\n---\n"
        "apiVersion: v1\nkind: Secret\nmetadata: {name: empty}\ntype: Opaque\n")
    (tmp_path / "kustomization.yaml").write_text(
        "secretGenerator:\n- name: lit\n  literals: [api-key=abc]\n- name: fromfile\n  envs: [api-key.env]\n"
        "- name: ignored\n  envs: [local.env]\n")
    problems = literal_k8s_secrets([tmp_path / "secret.yaml", tmp_path / "kustomization.yaml"],
                                   {"api-key.env"}, tmp_path)
    assert problems == [
        "secret.yaml: Secret 'leaked' has literal data/stringData",
        "kustomization.yaml: secretGenerator 'lit' has literals",
        "kustomization.yaml: secretGenerator 'fromfile' reads committed file api-key.env",
    ]


# ---- the real scans --------------------------------------------------------------------------------
def test_secrets_in_use_are_known():
    secrets = secrets_in_use()
    assert secrets["test API key (conftest.API_KEY)"] == API_KEY
    # Ray 2.60 turns token auth on for local clusters; when a token exists it must be scanned for.
    from llmserve_nb.cluster import read_ray_token

    assert ("Ray auth token" in secrets) == bool(read_ray_token())


def test_no_secret_in_executed_notebooks_or_runs(tmp_path_factory):
    outputs = _executed_outputs(tmp_path_factory)
    hits = scan_files(outputs, secrets_in_use())
    assert hits == [], "secrets in executed notebooks / runs/:\n" + "\n".join(hits)


def test_no_secret_in_committed_files():
    committed = _committed()
    paths = [REPO / p for p in committed if p not in KEY_DEFINED_IN]
    secrets = secrets_in_use()
    hits = scan_files(paths, secrets, REPO)
    # conftest.py may hold the throwaway test key, never the Ray token or another key.
    others = {k: v for k, v in secrets.items() if v != API_KEY}
    hits += scan_files([REPO / p for p in committed if p in KEY_DEFINED_IN], others, REPO)
    assert hits == [], "\n".join(hits)


def test_no_kubernetes_secret_with_literal_data_is_committed():
    committed = _committed()
    problems = literal_k8s_secrets([REPO / p for p in committed], set(committed), REPO)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("name", ["api-key.env", "auth_token", ".env"])
def test_secret_files_are_git_ignored_not_committed(name):
    assert not any(Path(p).name == name for p in _committed()), f"{name} is committed"
