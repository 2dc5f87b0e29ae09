"""`LocalAutoscalingCluster`: a Ray head with the autoscaler and Ray's fake multi-node provider on this
machine, on private ports and a private temp dir; and the process helpers that stop exactly its
processes (`cluster_processes`, `stop_processes`).

Ray's own `ray.cluster_utils.AutoscalingCluster` is not used: it runs `ray stop --force`, which kills
every Ray on the machine, and reads an example config the wheel does not ship. Here `stop()` ends
exactly the processes whose command line names this cluster's temp dir, plus their descendants (the
provider's worker nodes are children of the autoscaler's monitor).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llmserve_nb.cluster import Cluster, ClusterError, connect
from llmserve_nb.cluster.ports import LocalRayAddresses, free_ports
from llmserve_nb.experiments.cluster_autoscaling.config import (
    HEAD_NODE_TYPE,
    OBJECT_STORE_BYTES,
    WORKER_NODE_TYPE,
    autoscaling_config,
)

__all__ = ["LocalAutoscalingCluster", "cluster_processes", "stop_processes"]


def cluster_processes(temp_dir: str | Path) -> list[Any]:
    """The processes of the cluster in `temp_dir`: those whose command line names it, and their
    descendants (workers rename themselves, `ray::IDLE`; the fake provider's nodes are the monitor's
    children and use the head's temp dir)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    needle = str(temp_dir)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(needle in arg for arg in p.info["cmdline"] or ()):
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(temp_dir: str | Path, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes of the cluster in `temp_dir`, and only those.

    Raises ClusterError if one survives."""
    import psutil

    procs = cluster_processes(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    # The GCS lingers after SIGTERM, waiting for raylets that are already gone; it has no state to save.
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    # A raylet may fork a worker while the others are being stopped: look once more.
    late = []
    for p in cluster_processes(temp_dir):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                late.append(p)
        except psutil.NoSuchProcess:
            pass
    _, survivors = psutil.wait_procs(late, timeout=grace_s)
    if survivors:
        raise ClusterError(f"processes of the cluster in {temp_dir} survived SIGKILL: {[p.pid for p in survivors]}")


class LocalAutoscalingCluster(LocalRayAddresses):
    """A Ray head with the autoscaler and the fake multi-node provider, on private ports and temp dir.

    `start()` brings the head up (its dashboard at `.address`, Serve at `.serve_url`); worker nodes
    of `worker_cpus` CPUs each come and go as the autoscaler decides, between 0 and `max_workers`.
    Use it as a context manager, or call `stop()`: it stops only this cluster's processes.
    """

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, max_workers: int = 2, idle_timeout_s: float = 15.0,
                 upscaling_speed: float = 1.0, update_interval_s: int = 1, temp_dir: str | Path | None = None):
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.max_workers = max_workers
        self.idle_timeout_s = idle_timeout_s
        self.upscaling_speed = upscaling_speed
        # The autoscaler's loop period (Ray's default 5 s); each step of a scale-up waits for one tick.
        self.update_interval_s = update_interval_s
        # A caller may choose the (empty, short) temp dir, to find and stop the processes even if this
        # object is lost, e.g. a test running the notebook in a kernel that died.
        self._given_temp_dir = Path(temp_dir) if temp_dir is not None else None
        self.temp_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.token = secrets.token_hex(32)
        self.config: dict[str, Any] = {}
        self._clusters: list[Cluster] = []

    # ---- addresses --------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The head's dashboard: what `llmserve_nb.connect(address=...)` takes."""
        return self.dashboard_url

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> LocalAutoscalingCluster:
        """Start the head (and through it the autoscaler); returns once its dashboard and Serve answer."""
        if self.temp_dir is not None:
            raise ClusterError(f"this cluster already runs (temp dir {self.temp_dir})")
        # Short: Ray puts unix sockets under the temp dir, and their paths are limited to ~107 bytes.
        if self._given_temp_dir is not None and len(str(self._given_temp_dir)) > 40:
            raise ClusterError(f"temp dir {self._given_temp_dir} is too long for Ray's unix socket paths "
                               "(keep it under 40 characters)")
        self.temp_dir = self._given_temp_dir or Path(tempfile.mkdtemp(prefix="lsnb-as-", dir="/tmp"))
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        # `ray start` daemonizes: nothing would stop the nodes when this kernel exits without stop().
        atexit.register(self.stop)
        self.ports = free_ports(["gcs", "dashboard", "client", "serve", "agent", "metrics"])
        self.config = autoscaling_config(
            self.gcs_address, head_cpus=self.head_cpus, worker_cpus=self.worker_cpus, max_workers=self.max_workers,
            idle_timeout_s=self.idle_timeout_s, upscaling_speed=self.upscaling_speed,
        )
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(self.config, indent=1))
        # The monitor (autoscaler) inherits this environment and starts the worker nodes with it, so
        # every node runs with the same auth mode and token, whatever ~/.ray/auth_token holds.
        env = {
            **os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": str(self.update_interval_s),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        args = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--autoscaling-config", str(config_path),
            "--num-cpus", str(self.head_cpus), "--node-ip-address", "127.0.0.1",
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(self.temp_dir),
            "--port", str(self.ports["gcs"]), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.ports["dashboard"]), "--ray-client-server-port", str(self.ports["client"]),
            # Fixed defaults (52365, 8080) would collide with any other Ray on this machine.
            "--dashboard-agent-listen-port", str(self.ports["agent"]), "--metrics-export-port", str(self.ports["metrics"]),
            "--disable-usage-stats",
        ]
        try:
            r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
            if r.returncode != 0:
                raise ClusterError(f"`ray start --head` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            self._wait_head(timeout_s)
            self._start_serve()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_head(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer from the dashboard yet"
        while time.monotonic() < deadline:
            try:
                if self.nodes():
                    return
                last = "no ALIVE node yet"
            except (httpx.HTTPError, KeyError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1.0)
        raise ClusterError(f"the head did not come up within {timeout_s:.0f}s; last: {last}\n{self.log_tails()}")

    def _start_serve(self) -> None:
        # Serve starts with the first deploy; start it now with proxies on the head only. Every node here
        # shares one host, so a proxy per node (the package's EveryNode default) would fight over the
        # Serve port. Later deploys cannot change the proxy location of a running Serve.
        body = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": self.ports["serve"]},
                "applications": []}
        r = httpx.put(f"{self.address}/api/serve/applications/", json=body, headers=self._headers(), timeout=120.0)
        if r.status_code >= 400:
            raise ClusterError(f"starting Serve failed with HTTP {r.status_code}: {r.text[:2000]}")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def connect(self) -> Cluster:
        """The package's `Cluster` for this head (`connect(address, target="address", ...)`)."""
        cluster = connect(self.address, target="address", serve_url=self.serve_url, token=self.token)
        self._clusters.append(cluster)
        return cluster

    def nodes(self) -> list[dict[str, Any]]:
        """ALIVE nodes (node_id, head, node_type, total CPU), from the dashboard's state API."""
        r = httpx.get(f"{self.address}/api/v0/nodes", params={"detail": "true", "limit": 100},
                      headers=self._headers(), timeout=10.0)
        r.raise_for_status()
        return [
            {"node_id": n["node_id"], "head": bool(n.get("is_head_node")),
             "node_type": HEAD_NODE_TYPE if n.get("is_head_node") else WORKER_NODE_TYPE,
             "CPU": (n.get("resources_total") or {}).get("CPU", 0)}
            for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"
        ]

    def processes(self) -> list[Any]:
        """This cluster's processes (`cluster_processes`)."""
        return cluster_processes(self.temp_dir) if self.temp_dir is not None else []

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every process of this cluster (`stop_processes`, never `ray stop`); removes the temp dir.
        Raises ClusterError if a process survives."""
        for cluster in self._clusters:
            cluster._http.close()  # not shutdown(): the apps go down with the cluster, no need to delete them
        self._clusters.clear()
        if self.temp_dir is None:
            return
        atexit.unregister(self.stop)
        stop_processes(self.temp_dir, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of the head's and the autoscaler's logs (what to read when a node never came)."""
        out = []
        for name in ("monitor.log", "monitor.err", "gcs_server.err", "raylet.err", "dashboard.err"):
            for path in sorted((self.temp_dir or Path("/nonexistent")).glob(f"session_*/logs/{name}")):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    out.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(out)

    def __enter__(self) -> LocalAutoscalingCluster:
        return self.start() if self.temp_dir is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"dashboard {self.address}" if self.temp_dir else "not started"
        return (f"LocalAutoscalingCluster(head_cpus={self.head_cpus}, worker_cpus={self.worker_cpus}, "
                f"max_workers={self.max_workers}, idle_timeout_s={self.idle_timeout_s}; {where})")
