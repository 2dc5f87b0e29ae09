"""The Kubernetes-API side of `connect(kuberay=...)`: find a KubeRay cluster, wait for it, reach its head.

`KubeRayCluster(name, namespace)` reads a `RayCluster`, or a `RayService` and follows
`status.activeServiceStatus.rayClusterName` to the cluster that serves it. With `kind="auto"` it tries the
RayService first: a RayService name is the stable handle while the clusters behind it rotate on upgrades,
so if both kinds share the name, the RayService is what the user means.

`KubeRayCluster.connect()` returns URLs for the dashboard, Serve and the Ray client: in-cluster DNS when this
process runs in a pod, otherwise a `kubectl port-forward` to the head service (`llmserve_nb.cluster.portforward`)
through the same API server this object reads. A port-forward lives until `KubeRayConnection.close()` or, at the
latest, until this process exits.

The public way in is `llmserve_nb.connect(kuberay=name, namespace=...)`; this module is its Kubernetes side.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmserve_nb.cluster.errors import KubeRayError
from llmserve_nb.cluster.portforward import PortForward, kubeconfig_of

__all__ = [
    "HeadService",
    "KubeRayCluster",
    "KubeRayConnection",
    "auth_secret_name",
    "versions_from_image",
]

GROUP, VERSION = "ray.io", "v1"
_PLURAL = {"RayCluster": "rayclusters", "RayService": "rayservices"}
# KubeRay's port names on the head service; "gcs" is accepted too for hand-made services.
_PORT_NAMES = {
    "gcs": ("gcs-server", "gcs"),
    "dashboard": ("dashboard",),
    "client": ("client",),
    "serve": ("serve",),
    "metrics": ("metrics",),
}
_FORWARDED = ("dashboard", "serve", "client")
_RBAC_HINT = (
    "it needs get/list on rayclusters.ray.io, rayservices.ray.io, services and pods, "
    "create on pods/portforward, and get on the token secret"
)
# (connect, read) seconds for each Kubernetes API call: an unreachable API server fails, it never hangs.
_API_TIMEOUT = (5.0, 30.0)
# The key KubeRay's auth Secret keeps the token under (utils.RAY_AUTH_TOKEN_SECRET_KEY in v1.7).
AUTH_TOKEN_KEY = "auth_token"


@dataclass(frozen=True)
class HeadService:
    name: str
    namespace: str
    ports: dict[str, int]  # role ("gcs", "dashboard", "client", "serve", "metrics") -> service port

    @property
    def dns(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass
class KubeRayConnection:
    """Where the cluster answers. `close()` stops any port-forward; it is safe to call twice."""

    dashboard_url: str
    serve_url: str | None
    client_address: str | None
    how: Literal["in-cluster-dns", "port-forward"]
    ray_version: str | None
    python_version: str | None
    cluster_name: str
    namespace: str
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> KubeRayConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def versions_from_image(image: str | None) -> tuple[str | None, str | None]:
    """(ray, python) from a Ray image tag such as `rayproject/ray:2.60.0-py311-gpu`; None where it says nothing.

    Only images named ray/ray-ml/ray-llm are read: other tags (e.g. `llmserve-nb:0.1.0`) carry their own versions.
    """
    repo, _, tag = (image or "").rpartition(":")
    if "/" in tag or repo.rpartition("/")[2] not in ("ray", "ray-ml", "ray-llm"):
        return None, None
    ray = re.match(r"^(\d+\.\d+\.\d+)", tag)
    py = re.search(r"py(\d)(\d+)", tag)
    return (ray.group(1) if ray else None, f"{py.group(1)}.{py.group(2)}" if py else None)


def _message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _show(cond: dict[str, Any] | None, name: str) -> str:
    if cond is None:
        return f"{name}=?"
    extra = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    return f"{name}={cond.get('status')}" + (f" ({extra})" if extra else "")


def _raycluster_readiness(obj: dict[str, Any]) -> tuple[bool, str]:
    st = obj.get("status") or {}
    head, provisioned = _condition(st, "HeadPodReady"), _condition(st, "RayClusterProvisioned")
    suspended = _condition(st, "RayClusterSuspended")
    # Conditions are more precise than `state` (which KubeRay keeps for compatibility); use them when present.
    if head or provisioned:
        ready = all(c is not None and c.get("status") == "True" for c in (head, provisioned))
    else:
        ready = st.get("state") == "ready"
    if st.get("state") == "suspended" or (suspended and suspended.get("status") == "True"):
        ready = False
    workers = f"workers ready {st.get('readyWorkerReplicas', 0)}/{st.get('desiredWorkerReplicas', 0)}"
    conditions = f"{_show(head, 'HeadPodReady')}, {_show(provisioned, 'RayClusterProvisioned')}"
    return ready, f"state={st.get('state') or '-'}, {conditions}, {workers}"


def _rayservice_readiness(obj: dict[str, Any]) -> tuple[bool, str]:
    st = obj.get("status") or {}
    cond = _condition(st, "Ready")
    active = st.get("activeServiceStatus") or {}
    pending = (st.get("pendingServiceStatus") or {}).get("rayClusterName")
    # KubeRay before 1.3 has no conditions; its serviceStatus "Running" meant the same.
    ready = cond.get("status") == "True" if cond else st.get("serviceStatus") == "Running"
    ready = ready and bool(active.get("rayClusterName"))
    apps = ", ".join(
        f"{n}={(a or {}).get('status', '?')}" for n, a in (active.get("applicationStatuses") or {}).items()
    )
    summary = (
        f"{_show(cond, 'Ready')}, serviceStatus={st.get('serviceStatus') or '-'}, "
        f"active cluster={active.get('rayClusterName') or '-'}"
        + (f", pending cluster={pending}" if pending else "")
        + (f", apps: {apps}" if apps else "")
    )
    return ready, summary


def _default_namespace(context: str | None) -> str:
    """The pod's own namespace in a cluster, else the kubeconfig context's, else "default" (as kubectl does)."""
    from kubernetes import config

    sa_namespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if "KUBERNETES_SERVICE_HOST" in os.environ and os.path.exists(sa_namespace):
        with open(sa_namespace) as f:
            return f.read().strip()
    try:
        contexts, current = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
    except config.ConfigException:
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), current) if context else current
    return (chosen or {}).get("context", {}).get("namespace") or "default"


class KubeRayCluster:
    """A RayCluster or RayService by name, seen through the Kubernetes API."""

    def __init__(
        self,
        name: str,
        namespace: str | None = None,
        *,
        kind: Literal["auto", "RayCluster", "RayService"] = "auto",
        api_client: Any = None,
        context: str | None = None,
    ) -> None:
        from kubernetes import client, config

        self.name, self.context = name, context
        self.namespace = namespace or (_default_namespace(context) if api_client is None else "default")
        if kind not in ("auto", *_PLURAL):
            raise KubeRayError(f"kind must be 'auto', 'RayCluster' or 'RayService', not {kind!r}")
        self._kind = kind
        # The port-forward goes through the API server we read: the user's kubeconfig when we loaded it,
        # else one written from the caller's client.
        self._own_kubeconfig = api_client is None and "KUBERNETES_SERVICE_HOST" not in os.environ
        if api_client is None:
            try:
                if "KUBERNETES_SERVICE_HOST" in os.environ:
                    config.load_incluster_config()
                    api_client = client.ApiClient()
                else:
                    # $KUBECONFIG is read now, not at import: notebooks often set it after importing.
                    api_client = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"), context=context)
            except config.ConfigException as e:
                raise KubeRayError(
                    f"no Kubernetes credentials ({str(e).rstrip('.')}); set KUBECONFIG or run inside a pod"
                ) from None
        self._api = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    # ---- API calls with readable errors ------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kw: Any) -> Any:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=_API_TIMEOUT, **kw)
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status == 403:
                raise KubeRayError(
                    f"forbidden: cannot {what} in namespace {self.namespace!r} ({_message(e)}); " + _RBAC_HINT
                ) from None
            if e.status == 401:
                raise KubeRayError(
                    f"unauthorized: the Kubernetes API rejected our credentials while trying to {what} "
                    f"({_message(e)}); refresh the kubeconfig login"
                ) from None
            raise KubeRayError(
                f"cannot {what} in namespace {self.namespace!r}: HTTP {e.status} {_message(e)}"
            ) from None
        except HTTPError as e:
            raise KubeRayError(
                f"cannot reach the Kubernetes API at {self._api.configuration.host} to {what}: {e}"
            ) from None

    def _get_cr(self, kind: str, name: str) -> dict[str, Any] | None:
        return self._call(
            f"get {kind} {name!r}",
            self._custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            _PLURAL[kind],
            name,
            missing_ok=True,
        )

    def _names(self, kind: str) -> list[str]:
        found = self._call(
            f"list {_PLURAL[kind]}.ray.io",
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            _PLURAL[kind],
            missing_ok=True,
        )
        if found is None:
            raise KubeRayError(
                f"the Kubernetes API has no {_PLURAL[kind]}.{GROUP}/{VERSION} resource (HTTP 404): "
                f"is the KubeRay operator installed? Check `kubectl get crd {_PLURAL[kind]}.{GROUP}`."
            )
        return sorted(o["metadata"]["name"] for o in found.get("items", []))

    # ---- what the name refers to -------------------------------------------------------------------
    def resource(self) -> tuple[str, dict[str, Any]]:
        """(kind, object) of the custom resource the name refers to."""
        kinds = ["RayService", "RayCluster"] if self._kind == "auto" else [self._kind]
        for kind in kinds:
            obj = self._get_cr(kind, self.name)
            if obj is not None:
                self._kind = kind  # later polls skip the lookup that already failed
                return kind, obj
        there = "; ".join(f"{k}s: {', '.join(n) or 'none'}" for k in kinds for n in [self._names(k)])
        raise KubeRayError(
            f"no {' or '.join(kinds)} named {self.name!r} in namespace {self.namespace!r} (there: {there})"
        )

    def raycluster(self) -> dict[str, Any]:
        """The RayCluster object: the named one, or the RayService's active cluster."""
        kind, obj = self.resource()
        if kind == "RayCluster":
            return obj
        active = ((obj.get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
        if not active:
            raise KubeRayError(
                f"RayService {self.namespace}/{self.name} has no active RayCluster yet "
                f"({_rayservice_readiness(obj)[1]}); wait_ready() waits for one"
            )
        cluster = self._get_cr("RayCluster", active)
        if cluster is None:
            raise KubeRayError(
                f"RayService {self.namespace}/{self.name} names active RayCluster {active!r}, "
                f"which does not exist (RayClusters there: {', '.join(self._names('RayCluster')) or 'none'})"
            )
        return cluster

    def readiness(self) -> tuple[bool, str]:
        """(ready, one-line status summary) from the custom resource's status."""
        kind, obj = self.resource()
        ready, summary = (_rayservice_readiness if kind == "RayService" else _raycluster_readiness)(obj)
        return ready, f"{kind} {self.namespace}/{self.name}: {summary}"

    def wait_ready(
        self, timeout_s: float = 600.0, poll_s: float = 2.0, progress: Callable[[str], None] | None = None
    ) -> None:
        """Poll until ready; `progress` gets each status summary that differs from the last one."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            ready, summary = self.readiness()
            if summary != last and progress is not None:
                progress(summary)
            last = summary
            if ready:
                return
            if time.monotonic() >= deadline:
                raise KubeRayError(f"not ready after {timeout_s:g}s; last status seen: {summary}")
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))

    def versions(self, cluster: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
        """(ray, python) of the cluster: spec.rayVersion, else the head image tag; python from the tag only."""
        spec = (cluster or self.raycluster()).get("spec") or {}
        containers = (((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or [{}]
        ray, python = versions_from_image(containers[0].get("image"))
        return spec.get("rayVersion") or ray, python

    # ---- head service, pod and token ---------------------------------------------------------------
    def head_service(self, cluster: dict[str, Any] | None = None) -> HeadService:
        cluster = cluster or self.raycluster()
        cname = cluster["metadata"]["name"]
        # KubeRay shortens long names, so trust the name it reports over the `<cluster>-head-svc` convention.
        svc_name = ((cluster.get("status") or {}).get("head") or {}).get("serviceName") or f"{cname}-head-svc"
        svc = self._call(
            f"get service {svc_name!r}", self._core.read_namespaced_service, svc_name, self.namespace, missing_ok=True
        )
        if svc is None:
            names = [
                s.metadata.name
                for s in self._call("list services", self._core.list_namespaced_service, self.namespace).items
            ]
            raise KubeRayError(
                f"head service {svc_name!r} of RayCluster {cname!r} not found in namespace "
                f"{self.namespace!r} (services there: {', '.join(sorted(names)) or 'none'})"
            )
        by_name = {p.name: p.port for p in svc.spec.ports or [] if p.name}
        ports = {role: by_name[n] for role, names in _PORT_NAMES.items() for n in names if n in by_name}
        if "dashboard" not in ports:
            raise KubeRayError(
                f"head service {svc_name!r} has no port named 'dashboard' "
                f"(ports: {', '.join(f'{k}={v}' for k, v in by_name.items()) or 'none'})"
            )
        return HeadService(svc_name, self.namespace, ports)

    def auth_token(self, secret: str | None = None, cluster: dict[str, Any] | None = None) -> str | None:
        """Ray's auth token from the cluster's auth Secret (key `auth_token`); None when the cluster has no
        token auth.

        `secret` names the Secret. Otherwise KubeRay v1.7's own rule for a RayCluster whose spec has
        `authOptions.mode: token`: the Secret `authOptions.secretName`, or, without one, the Secret the
        operator generates, named after the RayCluster (for a RayService: its active cluster).
        """
        cluster = cluster or self.raycluster()
        options = (cluster.get("spec") or {}).get("authOptions") or {}
        if secret is None:
            if options.get("mode") != "token":
                return None
            if options.get("enableK8sTokenAuth"):
                raise KubeRayError(
                    f"RayCluster {self.namespace}/{cluster['metadata']['name']} delegates Ray auth to Kubernetes "
                    "(authOptions.enableK8sTokenAuth) and has no token Secret: pass token= a ServiceAccount token "
                    "that RBAC grants the ray:write verb"
                )
            secret = options.get("secretName") or auth_secret_name(cluster["metadata"]["name"])
        obj = self._call(
            f"get secret {secret!r}", self._core.read_namespaced_secret, secret, self.namespace, missing_ok=True
        )
        if obj is None:
            raise KubeRayError(
                f"auth token secret {secret!r} not found in namespace {self.namespace!r}; with authOptions.mode "
                "token the KubeRay operator (v1.6 or newer) creates it: is it running? (or pass token=)"
            )
        data = obj.data or {}
        if AUTH_TOKEN_KEY not in data:
            raise KubeRayError(
                f"secret {self.namespace}/{secret} has no key {AUTH_TOKEN_KEY!r} "
                f"(keys: {', '.join(sorted(data)) or 'none'})"
            )
        return base64.b64decode(data[AUTH_TOKEN_KEY]).decode().strip()

    # ---- connecting --------------------------------------------------------------------------------
    def connect(self) -> KubeRayConnection:
        """URLs for the (ready) cluster's head: in-cluster DNS inside a pod, a port-forward outside."""
        cluster = self.raycluster()
        svc = self.head_service(cluster)
        ray_version, python_version = self.versions(cluster)
        cname = cluster["metadata"]["name"]
        closers: list[Callable[[], None]] = []
        if "KUBERNETES_SERVICE_HOST" in os.environ:
            how: Literal["in-cluster-dns", "port-forward"] = "in-cluster-dns"
            addr = {role: (svc.dns, port) for role, port in svc.ports.items()}
        else:
            how = "port-forward"
            remote = {role: svc.ports[role] for role in _FORWARDED if role in svc.ports}
            kubeconfig = None if self._own_kubeconfig else kubeconfig_of(self._api.configuration, self.namespace)
            forward = PortForward(svc.name, self.namespace, list(remote.values()), context=self.context,
                                  kubeconfig=kubeconfig)
            closers.append(forward.close)
            addr = {role: ("127.0.0.1", forward.local[port]) for role, port in remote.items()}
        return KubeRayConnection(
            dashboard_url="http://%s:%d" % addr["dashboard"],
            serve_url="http://%s:%d" % addr["serve"] if "serve" in addr else None,
            client_address="ray://%s:%d" % addr["client"] if "client" in addr else None,
            how=how,
            ray_version=ray_version,
            python_version=python_version,
            cluster_name=cname,
            namespace=self.namespace,
            _closers=closers,
        )


def auth_secret_name(raycluster: str) -> str:
    """The name KubeRay v1.7 gives the auth Secret it generates for a RayCluster (its utils.CheckName):
    the last 50 characters of the cluster's name, a leading digit or punctuation replaced by "r"."""
    name = raycluster[-50:]
    if name[0].isdigit() or unicodedata.category(name[0]).startswith("P"):
        name = "r" + name[1:]
    return name

