"""Ray's cluster autoscaler on one machine: worker nodes are processes, added and removed on demand.

Serve autoscaling (`deployment.autoscaling`) changes how many *replicas* an app wants; Ray's cluster
autoscaler changes how many *nodes* there are to hold them. `LocalAutoscalingCluster` runs the second
one for real, locally: `ray start --head --autoscaling-config=...` with Ray's fake multi-node provider
(`provider.type: fake_multinode`), whose "cloud" launches each worker node as a set of Ray processes on
this machine. Replicas that do not fit make it add a node; a node idle for `idle_timeout_s` is removed.
It is the same autoscaler (v1, `ray.autoscaler._private.autoscaler.StandardAutoscaler`) that KubeRay's
in-tree autoscaling runs as a sidecar of the head pod (v1 unless `autoscalerOptions.version: v2`, which
this package does not render), with a provider that patches the RayCluster's
`workerGroupSpecs[].replicas` instead; the settings correspond one to one (`kuberay_autoscaling_config`,
`correspondence`).

Ray's own `ray.cluster_utils.AutoscalingCluster` is not used: it runs `ray stop --force`, which kills
every Ray on the machine, and reads an example config the wheel does not ship. Here the cluster gets a
private temp dir and free ports, and `stop()` ends exactly the processes whose command line names that
temp dir, plus their descendants (the provider's worker nodes are children of the autoscaler's monitor).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import httpx

from llmserve_nb.cluster import Cluster, ClusterError, connect
from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig

if TYPE_CHECKING:
    from llmserve_nb.k8s.options import ClusterSpec

__all__ = [
    "HEAD_NODE_TYPE",
    "WORKER_NODE_TYPE",
    "LocalAutoscalingCluster",
    "NodeReplicaTimeline",
    "autoscaling_config",
    "cluster_processes",
    "correspondence",
    "kuberay_autoscaling_config",
    "plot_timeline",
    "scale_out_and_back",
    "stop_processes",
]

# The fake provider registers its head under this type name; the config must use it too.
HEAD_NODE_TYPE = "ray.head.default"
# KubeRay names a worker node type after its workerGroupSpec; use the name this package renders.
WORKER_NODE_TYPE = "cpu-workers"
OBJECT_STORE_BYTES = 200 * 2**20  # each node's plasma store; Ray's default (30% of RAM per node) adds up fast


def autoscaling_config(
    gcs_address: str,
    *,
    head_cpus: int = 1,
    worker_cpus: int = 1,
    max_workers: int = 2,
    min_workers: int = 0,
    idle_timeout_s: float = 15.0,
    upscaling_speed: float = 1.0,
    cluster_name: str = "llmserve-nb-local",
) -> dict[str, Any]:
    """The cluster config `ray start --autoscaling-config` reads, for the fake multi-node provider.

    Everything Ray's validator (`ray-schema.json`) and the v1 autoscaler read is present, so nothing
    falls back to provider defaults meant for real clouds (auth, docker, setup commands are unused by
    this provider but required to exist).
    """
    if not 0 <= min_workers <= max_workers:
        raise ValueError(f"need 0 <= min_workers ({min_workers}) <= max_workers ({max_workers})")
    if head_cpus < 0 or worker_cpus < 1:
        raise ValueError("head_cpus must be >= 0 and worker_cpus >= 1")
    if idle_timeout_s < 0:
        raise ValueError("idle_timeout_s must be >= 0")
    return {
        "cluster_name": cluster_name,
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        # The v1 autoscaler reads minutes (any number); KubeRay's idleTimeoutSeconds is the same knob.
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            # Without it the provider assumes the GCS listens on 6379, which may be another cluster's.
            "gcs_address": gcs_address,
            # One node per launch request, as a cloud with slow instance starts would (v1 default).
            "launch_multiple": False,
            # All nodes share one IP here, so the autoscaler must tell them apart by node id.
            "use_node_id_as_ip": True,
            # No SSH, no setup commands: the provider starts Ray itself (as KubeRay's pods do).
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                # The provider passes these to the node it starts: CPU as --num-cpus, object_store_memory
                # as the plasma size; the autoscaler plans with the same numbers.
                "resources": {"CPU": worker_cpus, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": min_workers,
                "max_workers": max_workers,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def kuberay_autoscaling_config(spec: ClusterSpec | None = None, name: str = "llm-notebook") -> dict[str, Any]:
    """The autoscaling config KubeRay's in-tree autoscaler derives from the RayCluster this package
    renders (`llmserve_nb.k8s.render.raycluster`, what `k8s/raycluster-notebook.yaml` holds).

    The autoscaler sidecar reads the RayCluster and calls Ray's own
    `_derive_autoscaling_config_from_ray_cr` on it; so does this function, offline. `spec` is a
    `llmserve_nb.k8s.options.ClusterSpec` (default: the CPU profile, with a 0..2 worker group).
    """
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from llmserve_nb.k8s.options import CPU_CLUSTER
    from llmserve_nb.k8s.render import raycluster

    spec = spec or CPU_CLUSTER.model_copy(update={"min_workers": 0, "max_workers": 2})
    return _derive_autoscaling_config_from_ray_cr(raycluster(spec, name))


def correspondence(local: dict[str, Any], kuberay: dict[str, Any]) -> list[dict[str, Any]]:
    """Side by side: each autoscaler setting in the local config and in KubeRay's, with the RayCluster
    field it comes from there. Worker types are matched by name (KubeRay's are the `groupName`s)."""
    def worker_types(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}

    rows = [
        {"setting": "provider.type", "local": local["provider"]["type"], "kuberay": kuberay["provider"]["type"],
         "RayCluster field": "spec.enableInTreeAutoscaling: true (the autoscaler sidecar in the head pod)"},
        {"setting": "idle_timeout_minutes", "local": local["idle_timeout_minutes"],
         "kuberay": kuberay["idle_timeout_minutes"], "RayCluster field": "spec.autoscalerOptions.idleTimeoutSeconds / 60"},
        {"setting": "upscaling_speed", "local": local["upscaling_speed"], "kuberay": kuberay["upscaling_speed"],
         "RayCluster field": "spec.autoscalerOptions.upscalingMode (Conservative = 1, else 1000)"},
        {"setting": "max_workers (all types)", "local": local["max_workers"], "kuberay": kuberay["max_workers"],
         "RayCluster field": "sum of workerGroupSpecs[].maxReplicas"},
        {"setting": "head node type: CPU", "local": local["available_node_types"][local["head_node_type"]]["resources"].get("CPU"),
         "kuberay": kuberay["available_node_types"][kuberay["head_node_type"]]["resources"].get("CPU"),
         "RayCluster field": "headGroupSpec.rayStartParams.num-cpus"},
    ]
    kr_workers = worker_types(kuberay)
    for wname, w in worker_types(local).items():
        kw = kr_workers.get(wname, {})
        field = f"workerGroupSpecs[groupName={wname}]"
        for key, kr_field in (("min_workers", "minReplicas"), ("max_workers", "maxReplicas")):
            rows.append({"setting": f"{wname}: {key}", "local": w[key], "kuberay": kw.get(key),
                         "RayCluster field": f"{field}.{kr_field}"})
        rows.append({"setting": f"{wname}: CPU", "local": w["resources"].get("CPU"),
                     "kuberay": (kw.get("resources") or {}).get("CPU"),
                     "RayCluster field": f"{field}: container CPU limit (or rayStartParams.num-cpus)"})
    return rows


def _pick_ports(names: list[str]) -> dict[str, int]:
    """Free ephemeral ports on all interfaces (Ray binds 0.0.0.0), distinct from one another."""
    with ExitStack() as held:  # hold every socket until all are picked, so no two names get the same port
        ports = {}
        for name in names:
            s = held.enter_context(socket.socket())
            s.bind(("0.0.0.0", 0))
            ports[name] = s.getsockname()[1]
        return ports


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


class LocalAutoscalingCluster:
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
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['serve']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

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
        self.ports = _pick_ports(["gcs", "dashboard", "client", "serve", "agent", "metrics"])
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


class NodeReplicaTimeline:
    """Samples, every `interval_s` on a background thread: alive nodes, and the app's running and
    target replicas, and how many of those run on worker (autoscaled) nodes.

    `mark(label)` stamps an event (e.g. "scale up requested") on the same clock. Rows are dicts, ready
    for `pandas.DataFrame(timeline.rows)`.
    """

    def __init__(self, lac: LocalAutoscalingCluster, cluster: Cluster, app_name: str = "llm",
                 interval_s: float = 1.0, deployment: str = DEPLOYMENT_NAME):
        self.lac = lac
        self.cluster = cluster
        self.app_name = app_name
        self.deployment = deployment
        self.interval_s = interval_s
        self.rows: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.errors = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 2)

    def sample(self) -> dict[str, Any]:
        from llmserve_nb.experiments.reliability import replicas

        nodes = self.lac.nodes()
        head_ids = {n["node_id"] for n in nodes if n["head"]}
        reps = replicas(self.cluster, self.app_name, self.deployment)
        dep = (((self.cluster.serve_details().get("applications") or {}).get(self.app_name) or {})
               .get("deployments") or {}).get(self.deployment) or {}
        running = [r for r in reps if r.get("state") == "RUNNING"]
        row = {
            "t_s": self.now(),
            "nodes": len(nodes),
            "worker_nodes": len(nodes) - len(head_ids),
            "running_replicas": len(running),
            "target_replicas": dep.get("target_num_replicas") or 0,
            "replicas_on_workers": sum(r.get("node_id") not in head_ids for r in running),
        }
        self.rows.append(row)
        return row

    def mark(self, label: str) -> float:
        t = self.now()
        self.events.append({"t_s": t, "event": label})
        return t

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (httpx.HTTPError, ClusterError, KeyError):
                self.errors += 1  # a dashboard busy with a node joining; the next sample will tell
            self._stop.wait(self.interval_s)

    def start(self) -> NodeReplicaTimeline:
        self._thread = threading.Thread(target=self._loop, name="node-replica-timeline", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], since_s: float, timeout_s: float,
                 what: str) -> float:
        """Seconds on this timeline's clock at the first sample taken at or after `since_s` where
        `predicate(row)` holds (it may already have been taken); waits up to `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for row in list(self.rows):
                if row["t_s"] >= since_s and predicate(row):
                    return row["t_s"]
            time.sleep(self.interval_s / 2)
        last = self.rows[-1] if self.rows else "no sample"
        raise ClusterError(f"not within {timeout_s:.0f}s: {what} (last sample: {last})\n{self.lac.log_tails()}")


def scale_out_and_back(
    lac: LocalAutoscalingCluster,
    config: AppConfig | None = None,
    *,
    replicas: int = 2,
    interval_s: float = 1.0,
    timeout_s: float = 180.0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Deploy one replica, ask for `replicas` (more than the nodes hold), then go back to one.

    Measures, from the scale-up request: a worker node joining, and all replicas RUNNING with one
    more of them on worker nodes; from the scale-down request: the replica stopped and the idle node
    removed. `config` defaults to the embedded model; each replica asks for one worker's CPUs, so one
    extra replica needs one extra node. Returns {"summary": {...}, "timeline": rows, "events": [...]}.
    The app is deleted at the end; the cluster keeps running.
    """
    if replicas < 2:
        raise ValueError("replicas must be >= 2: one more than the deployment starts with")
    config = (config or AppConfig()).with_overrides(**{"deployment.num_cpus": lac.worker_cpus,
                                                       "deployment.autoscaling": None})
    say = progress or (lambda _: None)
    cluster = lac.connect()
    timeline = NodeReplicaTimeline(lac, cluster, config.name, interval_s=interval_s).start()
    try:
        timeline.mark("deploy 1 replica")
        handle = cluster.deploy(config.with_overrides(**{"deployment.num_replicas": 1}), timeout_s=timeout_s,
                                progress=None)
        base = timeline.sample()
        say(f"[{timeline.now():6.1f}s] 1 replica RUNNING; nodes: {base['nodes']}")

        up = timeline.mark(f"scale to {replicas} replicas")
        handle.update(config.with_overrides(**{"deployment.num_replicas": replicas}), timeout_s=timeout_s)
        node_added = timeline.wait_for(lambda r: r["worker_nodes"] > base["worker_nodes"], up, timeout_s,
                                       "a worker node joined")
        all_running = timeline.wait_for(
            lambda r: r["running_replicas"] >= replicas and r["replicas_on_workers"] > base["replicas_on_workers"],
            up, timeout_s, f"{replicas} replicas RUNNING, one more on worker nodes")
        peak = max(timeline.rows, key=lambda r: r["nodes"])
        say(f"[{timeline.now():6.1f}s] {replicas} replicas RUNNING; nodes: {peak['nodes']} "
            f"(a node joined {node_added - up:.1f}s after the request)")

        down = timeline.mark("scale to 1 replica")
        handle.update(config.with_overrides(**{"deployment.num_replicas": 1}), timeout_s=timeout_s)
        replica_gone = timeline.wait_for(lambda r: r["running_replicas"] == 1 and r["target_replicas"] == 1,
                                         down, timeout_s, "back to 1 replica")
        node_removed = timeline.wait_for(lambda r: r["worker_nodes"] <= base["worker_nodes"], replica_gone,
                                         timeout_s + lac.idle_timeout_s, "the idle worker node removed")
        timeline.mark("idle node removed")
        say(f"[{timeline.now():6.1f}s] worker node removed {node_removed - replica_gone:.1f}s after its replica "
            f"stopped (idle timeout {lac.idle_timeout_s:g}s)")
    finally:
        timeline.stop()
    try:
        cluster.delete(config.name)
    except ClusterError as e:
        say(f"could not delete {config.name!r}: {e}")
    rows = timeline.rows
    summary = {
        "replicas_requested": replicas,
        "idle_timeout_s": lac.idle_timeout_s,
        "nodes_before": base["nodes"],
        "nodes_peak": peak["nodes"],
        "nodes_after": rows[-1]["nodes"],
        "replicas_before": base["running_replicas"],
        "replicas_peak": max(r["running_replicas"] for r in rows),
        "replicas_after": rows[-1]["running_replicas"],
        "replicas_on_workers_before": base["replicas_on_workers"],
        "replicas_on_workers_peak": max(r["replicas_on_workers"] for r in rows),
        "s_to_node_added": round(node_added - up, 1),
        "s_to_replica_running": round(all_running - up, 1),
        "s_to_replica_stopped": round(replica_gone - down, 1),
        "s_to_node_removed": round(node_removed - down, 1),
        "s_node_idle_before_removed": round(node_removed - replica_gone, 1),
        "samples": len(rows),
        "sample_errors": timeline.errors,
    }
    return {"summary": summary, "timeline": rows, "events": timeline.events}


def plot_timeline(result: dict[str, Any], ax=None):
    """Node count beside replica count over time (steps), with the scale requests as vertical lines."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    rows = result["timeline"]
    t = [r["t_s"] for r in rows]
    # Wide and pale underneath, so the replica lines stay visible where the counts are equal.
    ax.step(t, [r["nodes"] for r in rows], where="post", label="alive nodes", color="tab:red", linewidth=4, alpha=0.5)
    ax.step(t, [r["running_replicas"] for r in rows], where="post", label="running replicas", color="tab:blue")
    ax.step(t, [r["target_replicas"] for r in rows], where="post", label="target replicas", color="tab:blue",
            linestyle=":")
    top = max(max(r["nodes"] for r in rows), max(r["target_replicas"] for r in rows)) + 1
    ax.set_ylim(0, top + 0.5)
    ax.set_yticks(range(0, top + 1))
    for ev in result.get("events", []):
        ax.axvline(ev["t_s"], color="grey", linewidth=0.8, linestyle="--")
        ax.annotate(ev["event"], (ev["t_s"], top + 0.4), rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.set_title("Ray cluster autoscaler: nodes follow replicas")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax
