"""Roll out a new model or version without dropping a request (Serve side).

A second version runs next to the first as its own Serve application (own name and route prefix);
a small router application at the public route prefix splits traffic between them by weight, sticky
by a session header (`X-Session-Id`), and names the answering version in `x-served-by`. Weights are
the router's `user_config`, changed in place. `Rollout` deploys, shifts, compares, promotes and rolls
back; `TrafficLoad` drives sticky closed-loop load through the public route and records who answered.
See `core` for the layout and `router` for why a router (and why HTTP) rather than a Serve built-in.
The Kubernetes side (KubeRay incremental upgrade, Gateway API split) is `llmserve_nb.k8s.rollout`.
"""
from llmserve_nb.rollout.core import Rollout, RolloutError
from llmserve_nb.rollout.load import (
    Sample,
    TrafficLoad,
    plot_traffic_share,
    share_over_time,
    stickiness_violations,
    summarize,
)
from llmserve_nb.rollout.routing import (
    EPOCH_HEADER,
    SERVED_BY_HEADER,
    RouterConfig,
    Version,
    pick_version,
)

__all__ = [
    "EPOCH_HEADER",
    "SERVED_BY_HEADER",
    "Rollout",
    "RolloutError",
    "RouterConfig",
    "Sample",
    "TrafficLoad",
    "Version",
    "pick_version",
    "plot_traffic_share",
    "share_over_time",
    "stickiness_violations",
    "summarize",
]
