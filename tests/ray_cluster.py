"""A real two-node Ray cluster on this machine, started with `ray start` like a KubeRay head and worker pod.

The head takes the ports a KubeRay head Service exposes (6379 GCS, 8265 dashboard, 10001 client, 8000 Serve)
where they are free, else ephemeral ones. Token auth is on, with a token made here and handed to both nodes
through the environment: the same mode and token everywhere, whatever `~/.ray/auth_token` holds.

Never `ray stop`: it kills every Ray on the machine, other people's included. Everything started here is
found again by its temp dir (in the daemons' command lines) plus their descendants, and stopped by PID.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from llmserve_nb.cluster import ClusterError
from llmserve_nb.cluster.ports import LocalRayAddresses, free_port, free_ports
from llmserve_nb.experiments.cluster_autoscaling import stop_processes

HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
WORKER_RESOURCE = "node2"
RAY = str(Path(sys.executable).with_name("ray"))


class RayClusterError(RuntimeError):
    """The test cluster did not come up (the message carries the `ray start` output and log tails)."""


@dataclass
class RayTestCluster(LocalRayAddresses):
    temp_dir: Path
    token: str
    ports: dict[str, int]
    head_node_id: str = ""
    worker_node_id: str = ""


def _pick_ports(preferred: dict[str, int]) -> dict[str, int]:
    """Each preferred port (0: none) if it is free on all interfaces (Ray binds 0.0.0.0), else an ephemeral one.
    The ephemeral ones are distinct, and never a preferred one: those lie below the ephemeral range."""
    ports = free_ports(list(preferred))
    for name, port in preferred.items():
        if port and free_port(port, host="0.0.0.0") == port:
            ports[name] = port
    return ports


def _ray_start(args: list[str], env: dict[str, str], timeout_s: float) -> None:
    # `ray start` daemonizes its processes and returns; its own output explains a failure.
    r = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RayClusterError(f"`ray start {' '.join(args)}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _alive_nodes(c: RayTestCluster) -> list[dict]:
    r = httpx.get(f"{c.dashboard_url}/api/v0/nodes", params={"detail": "true", "limit": 100},
                  headers={"Authorization": f"Bearer {c.token}"}, timeout=10.0)
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _wait_nodes(c: RayTestCluster, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    last = "no answer from the dashboard yet"
    while time.monotonic() < deadline:
        try:
            nodes = _alive_nodes(c)
            if len(nodes) >= count:
                return nodes
            last = f"{len(nodes)} node(s) ALIVE"
        except (httpx.HTTPError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise RayClusterError(f"wanted {count} ALIVE node(s) within {timeout_s:.0f}s; last: {last}\n{_log_tails(c.temp_dir)}")


def _log_tails(temp_dir: Path, lines: int = 15) -> str:
    out = []
    for name in ("gcs_server.err", "raylet.err", "dashboard.err", "dashboard.log"):
        for path in sorted(temp_dir.glob(f"session_*/logs/{name}")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                out.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(out)


def start_cluster(timeout_s: float = 120.0, attempts: int = 3) -> RayTestCluster:
    """Head (1 CPU) plus one worker (1 CPU, custom resource `node2`), both ALIVE; stop it with `stop_cluster`.

    Another process can take a picked port before Ray binds it (e.g. a second test run starting its
    own Ray): then start again on freshly picked ports."""
    for attempt in range(attempts):
        try:
            return _start_once(timeout_s)
        except RayClusterError as e:
            if attempt == attempts - 1 or "address already in use" not in str(e):
                raise
    raise RayClusterError("attempts must be >= 1")


def _start_once(timeout_s: float) -> RayTestCluster:
    # Short: Ray puts unix sockets under the temp dir, and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lsnb-", dir="/tmp"))
    ports = _pick_ports({**HEAD_PORTS, "head_agent": 0, "worker_agent": 0})
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    c = RayTestCluster(temp_dir=temp_dir, token=token, ports=ports)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
              "--disable-usage-stats"]
    try:
        _ray_start([
            "--head", *common, "--temp-dir", str(temp_dir), "--port", str(ports["gcs"]),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
            "--ray-client-server-port", str(ports["client"]),
            # The agent's default HTTP port (52365) is fixed: two nodes on one machine would collide on it.
            "--dashboard-agent-listen-port", str(ports["head_agent"]),
        ], env, timeout_s)
        head = _wait_nodes(c, 1, timeout_s)[0]
        _ray_start([
            "--address", c.gcs_address, *common, "--resources", json.dumps({WORKER_RESOURCE: 1}),
            "--dashboard-agent-listen-port", str(ports["worker_agent"]),
        ], env, timeout_s)
        nodes = _wait_nodes(c, 2, timeout_s)
    except BaseException:
        stop_cluster(c)
        raise
    c.head_node_id = head["node_id"]
    c.worker_node_id = next(n["node_id"] for n in nodes if WORKER_RESOURCE in n.get("resources_total", {}))
    return c


@contextmanager
def running_cluster(timeout_s: float = 120.0) -> Iterator[RayTestCluster]:
    c = start_cluster(timeout_s)
    try:
        yield c
    finally:
        stop_cluster(c)


def stop_cluster(c: RayTestCluster, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process of this cluster; raise if any survives. Removes the temp dir."""
    try:
        stop_processes(c.temp_dir, grace_s)
    except ClusterError as e:
        raise RayClusterError(str(e)) from None
    shutil.rmtree(c.temp_dir, ignore_errors=True)
