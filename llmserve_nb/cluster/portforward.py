"""`kubectl port-forward` to a Kubernetes service: how a kernel outside the cluster reaches a KubeRay head.

kubectl is the one port-forward here: it is what Kubernetes users already run, it speaks every auth
the kubeconfig can hold (exec plugins included), and its behaviour is checkable from outside (the
lines it prints, its exit). It talks to the API server of the kubeconfig it is given: the user's own,
or, for a caller's `kubernetes` ApiClient, a private one written from that client's configuration
(`kubeconfig_of`), so the forward always goes to the cluster that was read.

A forward lives until `PortForward.close()` or, at the latest, until this process exits.
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from llmserve_nb.cluster.errors import KubeRayError

__all__ = ["PortForward", "kubeconfig_of"]

log = logging.getLogger(__name__)

_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


def kubeconfig_of(configuration: Any, namespace: str) -> dict[str, Any]:
    """A kubeconfig naming the API server, TLS settings and credentials (bearer token, client certificate)
    of a `kubernetes.client.Configuration`."""
    cluster: dict[str, Any] = {"server": configuration.host}
    for key, value in (("certificate-authority", configuration.ssl_ca_cert),
                       ("tls-server-name", getattr(configuration, "tls_server_name", None)),
                       ("proxy-url", configuration.proxy)):
        if value:
            cluster[key] = value
    if not configuration.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    user: dict[str, Any] = {}
    # The client keeps the whole header value ("Bearer <token>"; "bearer" in a pod), as its auth_settings reads it.
    scheme, _, token = (configuration.get_api_key_with_prefix("BearerToken", alias="authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        user["token"] = token.strip()
    if configuration.cert_file:
        user["client-certificate"] = configuration.cert_file
    if configuration.key_file:
        user["client-key"] = configuration.key_file
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "api", "cluster": cluster}],
        "users": [{"name": "api", "user": user}],
        "contexts": [{"name": "api", "context": {"cluster": "api", "user": "api", "namespace": namespace}}],
        "current-context": "api",
    }


class PortForward:
    """`kubectl port-forward svc/<service> :<port>...` on 127.0.0.1; `local` maps each remote port to its
    local one. `kubeconfig` (a dict) replaces the user's kubeconfig; `context` picks a context of theirs.
    `close()` stops kubectl and is safe to call twice; kubectl's stderr goes to this module's log."""

    def __init__(self, service: str, namespace: str, ports: list[int], *, context: str | None = None,
                 kubeconfig: dict[str, Any] | None = None, timeout_s: float = 20.0) -> None:
        if shutil.which("kubectl") is None:
            raise KubeRayError(
                "reaching a KubeRay cluster from outside it needs `kubectl` on PATH for the port-forward "
                "(https://kubernetes.io/docs/tasks/tools/), or run this kernel in a pod of that cluster"
            )
        self.service = service
        self.local: dict[int, int] = {}
        self._kubeconfig_file: str | None = None
        cmd = ["kubectl", "port-forward", "--address", "127.0.0.1", "-n", namespace, f"svc/{service}",
               *[f":{p}" for p in ports]]
        if kubeconfig is not None:
            fd, self._kubeconfig_file = tempfile.mkstemp(prefix="llmserve-nb-kubeconfig-", suffix=".json")
            with os.fdopen(fd, "w") as f:  # mkstemp's file is private to this user: it holds a token
                json.dump(kubeconfig, f)
            cmd[1:1] = ["--kubeconfig", self._kubeconfig_file]
        elif context:
            cmd[1:1] = ["--context", context]
        self.command = " ".join(cmd)
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
        except OSError as e:
            self._remove_kubeconfig()
            raise KubeRayError(f"cannot start `{self.command}`: {e}") from None
        # A kernel that exits (or restarts) without closing the connection must not leave kubectl running.
        atexit.register(self.close)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._forwarding = threading.Event()  # set once every port is known; later lines only need draining
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        # Both pipes are read for the forward's whole life: kubectl logs every connection (and every failed
        # one to stderr), and a full pipe would block it.
        self._pumps = [threading.Thread(target=pump, daemon=True, name=f"kubectl-port-forward-{service}-{name}")
                       for name, pump in (("stdout", self._pump_stdout), ("stderr", self._pump_stderr))]
        for pump in self._pumps:
            pump.start()
        try:
            self._wait_forwarding(ports, timeout_s)
        except KubeRayError:
            self.close()
            raise

    def _pump_stdout(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            if not self._forwarding.is_set():
                self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self._proc.stderr:  # type: ignore[union-attr]
            self._stderr_tail.append(line.rstrip())
            log.warning("kubectl port-forward svc/%s: %s", self.service, line.rstrip())

    def _wait_forwarding(self, ports: list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.local) < len(ports):
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise KubeRayError(
                    f"`{self.command}` printed no forwarding for ports {ports} within {timeout_s:g}s"
                ) from None
            if line is None:
                self._proc.wait()
                self._pumps[1].join(5)
                err = "\n".join(self._stderr_tail)
                raise KubeRayError(f"`{self.command}` exited with {self._proc.returncode}: {err or 'no message'}")
            if m := _FORWARDING.search(line):
                self.local[int(m.group(2))] = int(m.group(1))
        self._forwarding.set()

    def close(self) -> None:
        atexit.unregister(self.close)
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._remove_kubeconfig()

    def _remove_kubeconfig(self) -> None:
        if self._kubeconfig_file is not None:
            os.unlink(self._kubeconfig_file)
            self._kubeconfig_file = None

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
