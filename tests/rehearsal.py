"""A RayService rehearsed without Kubernetes: what KubeRay does with the committed manifests, done here.

`render_rayservice` renders `kubectl kustomize k8s/overlays/cpu` from a copy of k8s/ holding a freshly
generated api-key.env (the Secret is never committed), and reads the RayService and its Secrets back.
`RehearsalCluster` then plays the operator: it starts one Ray head and the worker groups with the manifest's
rayStartParams turned into `ray start --block` flags as KubeRay turns them (num-cpus, memory and num-gpus
from the container's limits unless the params set them), token auth from authOptions (a generated
RAY_AUTH_TOKEN, as KubeRay's auth Secret holds), each container's env with its secretKeyRefs resolved, then
PUTs the serveConfigV2 to the dashboard and waits for RUNNING, failing with Serve's own message otherwise.

Where it runs is a `Launcher`: a venv's bin dir on this machine, or a container of the image
(`tests/image.py`); the cluster code is the same for both. Only what one machine forces is adapted: ports
are remapped to free ones (two nodes share one host), node IP 127.0.0.1, a short private temp dir, a small
object store. Every process is started in its own session and stopped by process group and by temp dir,
never by `ray stop`, which would take down every Ray on the machine.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmserve_nb.cluster import Cluster
from llmserve_nb.cluster.ports import LocalRayAddresses, free_ports
from llmserve_nb.experiments.cluster_autoscaling import stop_processes

__all__ = ["Launcher", "RehearsalCluster", "RehearsalError", "RenderedService", "check_outside_source",
           "container_env", "render_rayservice", "start_params", "venv_launcher"]

ROOT = Path(__file__).resolve().parents[1]
# The ports a pod has to itself and two nodes on one host would fight over, by rayStartParams name.
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORTS = ("metrics-export-port", "dashboard-agent-listen-port")
# KubeRay's own additions to every `ray start` (its defaults for these two ports).
KUBERAY_DEFAULTS = {"metrics-export-port": "8080", "dashboard-agent-listen-port": "52365"}
OBJECT_STORE_BYTES = 200 * 2**20


class RehearsalError(RuntimeError):
    """The rehearsed RayService did not come up; the message says where it stopped, with Serve's or Ray's words."""


@dataclass
class RenderedService:
    rayservice: dict[str, Any]
    secrets: dict[str, dict[str, str]]  # Secret name -> decoded data
    api_key: str

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def cluster_spec(self) -> dict[str, Any]:
        return self.rayservice["spec"]["rayClusterConfig"]


def render_rayservice(kubectl: str, overlay: str = "overlays/cpu", workdir: Path | None = None) -> RenderedService:
    """The one RayService of `kubectl kustomize k8s/<overlay>`, rendered from a copy of k8s/ with a generated
    api-key.env, as a user does before `kubectl apply -k` (k8s/base/api-key.env.example)."""
    tmp = Path(tempfile.mkdtemp(prefix="k8s-", dir=workdir))
    try:
        tree = shutil.copytree(ROOT / "k8s", tmp / "k8s")
        key = secrets.token_hex(32)
        (tree / "base" / "api-key.env").write_text(f"api-key={key}\n")
        done = subprocess.run([kubectl, "kustomize", str(tree / overlay)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RehearsalError(f"kubectl kustomize k8s/{overlay} failed:\n{done.stderr[-3000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    services = [d for d in docs if d["kind"] == "RayService"]
    if len(services) != 1:
        raise RehearsalError(f"k8s/{overlay} renders {len(services)} RayServices, the rehearsal wants one")
    found = {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
             | dict(d.get("stringData") or {}) for d in docs if d["kind"] == "Secret"}
    return RenderedService(services[0], found, key)


def container_env(container: dict[str, Any], found: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's `env`, secretKeyRefs resolved; a missing required key fails as the kubelet would."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            raise RehearsalError(f"env {var['name']}: only value and secretKeyRef are rehearsed, got {var}")
        value = found.get(ref["name"], {}).get(ref["key"])
        if value is None and not ref.get("optional"):
            raise RehearsalError(f"CreateContainerConfigError: env {var['name']}: couldn't find key {ref['key']} "
                                 f"in Secret {ref['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if str(value).endswith(suffix):
            return float(str(value)[: -len(suffix)]) * units[suffix]
    return float(value)


def start_params(group: dict[str, Any]) -> dict[str, str]:
    """A group's `ray start` params as KubeRay makes them: its defaults, then num-cpus, memory and num-gpus
    from the Ray container's limits (requests where no limit is set), then the manifest's rayStartParams."""
    container = group["template"]["spec"]["containers"][0]
    res = container.get("resources") or {}
    amounts = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    params = dict(KUBERAY_DEFAULTS)
    if "cpu" in amounts:
        params["num-cpus"] = str(int(-(-_quantity(amounts["cpu"]) // 1)))
    if "memory" in amounts:
        params["memory"] = str(int(_quantity(amounts["memory"])))
    if "nvidia.com/gpu" in amounts:
        params["num-gpus"] = str(int(_quantity(amounts["nvidia.com/gpu"])))
    params.update({k: str(v) for k, v in (group.get("rayStartParams") or {}).items()})
    return params


def _flags(params: dict[str, str]) -> list[str]:
    return [f"--{k}" if v == "true" else f"--{k}={v}" for k, v in params.items() if v != "false"]


@dataclass
class Launcher:
    """Where the cluster's programs run. `bin_dir` holds its python and ray; `wrap` turns (argv, env) into
    the host command line and the host env that runs argv with exactly env (None: run it here)."""
    name: str
    bin_dir: str
    wrap: Callable[[list[str], dict[str, str]], tuple[list[str], dict[str, str]]] | None = None

    def command(self, argv: Sequence[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        argv = [f"{self.bin_dir}/{argv[0]}", *argv[1:]]
        return self.wrap(argv, env) if self.wrap else (argv, env)


@dataclass
class RehearsalCluster(LocalRayAddresses):
    """The rendered RayService, run on this machine from `launcher`; `start()`, `deploy()`, `stop()`."""
    service: RenderedService
    launcher: Launcher
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lsnbr-", dir="/tmp")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    start_timeout_s: float = 180.0

    @property
    def base_env(self) -> dict[str, str]:
        """What every node gets besides its container env: KubeRay's auth env, no source tree, no host venv."""
        env = {"PATH": f"{self.launcher.bin_dir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "HOME": os.environ.get("HOME", "/root") if self.launcher.wrap is None else "/home/ray",
               "RAY_USAGE_STATS_ENABLED": "0"}
        if (self.service.cluster_spec.get("authOptions") or {}).get("mode") == "token":
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        return env

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
        """Run a short command where the cluster runs, from the temp dir; its stdout, or RehearsalError."""
        cmd, host_env = self.launcher.command(argv, {**self.base_env, **(env or {})})
        done = subprocess.run(cmd, env=host_env, cwd=self.temp_dir, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RehearsalError(f"{' '.join(argv)} exited {done.returncode} in {self.launcher.name}:\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def _start_node(self, role: str, group: dict[str, Any], extra: dict[str, str]) -> None:
        params = start_params(group) | extra
        argv = ["ray", "start", *(["--head"] if role == "head" else []), "--block", *_flags(params),
                "--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        if role == "head":
            argv.append(f"--temp-dir={self.temp_dir}")
        env = {**self.base_env, **container_env(group["template"]["spec"]["containers"][0], self.service.secrets)}
        cmd, host_env = self.launcher.command(argv, env)
        log = (self.temp_dir / f"{role}.log").open("w")
        # A session of its own, so stop() can end this node's whole process group and nothing else.
        self.procs.append(subprocess.Popen(cmd, env=host_env, cwd=self.temp_dir, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def _node_ports(self, role: str) -> dict[str, str]:
        return {k: str(self.ports[f"{role}:{k}"]) for k in NODE_PORTS}

    def start(self) -> None:
        """The head, then every worker group's replicas, each waited for until the dashboard lists it ALIVE."""
        spec = self.service.cluster_spec
        workers = [(f"{g['groupName']}-{i}", g) for g in spec.get("workerGroupSpecs", []) for i in range(g.get("replicas", 1))]
        names = ["serve", *HEAD_PORTS, *(f"{node}:{k}" for node in ["head", *(w for w, _ in workers)] for k in NODE_PORTS)]
        self.ports = free_ports(names)
        # LocalRayAddresses' names for the two the harness and the notebook side reach.
        self.ports.update(gcs=self.ports["port"], dashboard=self.ports["dashboard-port"])
        self._start_node("head", spec["headGroupSpec"],
                         {**{k: str(self.ports[k]) for k in HEAD_PORTS}, **self._node_ports("head")})
        self.wait_nodes(1)
        for i, (name, group) in enumerate(workers):
            self._start_node(name, group, {"address": self.gcs_address, **self._node_ports(name)})
            self.wait_nodes(2 + i)

    def _alive_nodes(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"detail": "true", "limit": 100},
                      headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def wait_nodes(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer from the dashboard yet"
        while time.monotonic() < deadline:
            if exited := [p for p in self.procs if p.poll() is not None]:
                raise RehearsalError(f"`ray start` exited {exited[0].returncode} in {self.launcher.name}:\n{self.logs()}")
            try:
                nodes = self._alive_nodes()
                if len(nodes) >= count:
                    return nodes
                last = f"{len(nodes)} node(s) ALIVE"
            except (httpx.HTTPError, KeyError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1.0)
        raise RehearsalError(f"wanted {count} ALIVE node(s) within {self.start_timeout_s:.0f}s; last: {last}\n{self.logs()}")

    def logs(self, lines: int = 25) -> str:
        out = []
        for path in [*sorted(self.temp_dir.glob("*.log")), *sorted(self.temp_dir.glob("session_latest/logs/serve/*.log"))]:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['serve']}"

    def client(self) -> Cluster:
        """The notebook side's client of this cluster (dashboard REST with the token)."""
        return Cluster(self.dashboard_url, self.serve_url, kind="address", how="rehearsal", token=self.token)

    def deploy(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """PUT the serveConfigV2 (Serve's port remapped) as KubeRay does; wait until every app is RUNNING.
        Raises RehearsalError with Serve's messages when an app fails or the time is up."""
        config = self.service.serve_config
        config.setdefault("http_options", {})["port"] = self.ports["serve"]
        r = httpx.put(f"{self.dashboard_url}/api/serve/applications/", json=config,
                      headers={"Authorization": f"Bearer {self.token}"}, timeout=60.0)
        if r.status_code >= 400:
            raise RehearsalError(f"PUT serveConfigV2 answered HTTP {r.status_code}: {r.text[:3000]}")
        names = [app["name"] for app in config["applications"]]
        client = self.client()
        t0 = time.monotonic()
        try:
            while True:
                apps = client.app_statuses()
                states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
                failed = [apps[n] for n in names if states[n] in ("DEPLOY_FAILED", "UNHEALTHY")]
                if failed:
                    messages = failed[0].serve_messages()
                    # A replica's traceback ends with the reason: say it first, then the whole of it.
                    reason = next((line.strip() for line in reversed(messages.splitlines()) if line.strip()), "")
                    raise RehearsalError(f"Serve app {failed[0].name!r} of RayService "
                                         f"{self.service.rayservice['metadata']['name']!r} is {failed[0].status} "
                                         f"in {self.launcher.name}: {reason}\n{messages}")
                if all(s == "RUNNING" for s in states.values()):
                    return config
                if time.monotonic() - t0 > timeout_s:
                    raise RehearsalError(f"Serve apps not RUNNING after {timeout_s:.0f}s in {self.launcher.name}: "
                                         f"{states}; {[apps[n].serve_messages() for n in names if n in apps]}\n{self.logs()}")
                time.sleep(1.0)
        finally:
            client.close()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each node's process group, then whatever of this cluster survives (found by its temp dir)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=grace_s)
        stop_processes(self.temp_dir, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def venv_launcher(python: Path) -> Launcher:
    return Launcher(f"venv {python.parent.parent}", str(python.parent))


def check_outside_source(cluster: RehearsalCluster) -> str:
    """Where the cluster's python imports llmserve_nb from; RehearsalError if the source tree is visible."""
    out = cluster.run(["python", "-c", "import json, sys, llmserve_nb; print(json.dumps([llmserve_nb.__file__, sys.path]))"])
    where, path = json.loads(out.strip().splitlines()[-1])
    leaks = [p for p in [where, *path] if p and str(ROOT) in p]
    if leaks:
        raise RehearsalError(f"the cluster's python sees the source tree: {leaks}")
    return where
