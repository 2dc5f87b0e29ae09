"""Where the model runs: connect to a Ray cluster and deploy apps to it through the Serve REST API.

`connect()` picks one of three targets: an embedded local Ray (the default), a running cluster's
dashboard (`address=`), or a KubeRay RayCluster/RayService by name (`kuberay=`). Whatever the target,
deploys go through `PUT /api/serve/applications/`, the same declarative path KubeRay uses, so the
local default exercises exactly the code that drives a remote cluster. Ray Client is never used.

Every HTTP call made here has a timeout, and every failure to reach the cluster or the app is a
`ClusterError` that names the URL and what to check. See `targets` for `connect()`, `client` for
`Cluster`, `app` for `AppHandle`, `status` for Serve's status as typed records (`AppStatus`),
`kuberay` and `portforward` for the Kubernetes side, `shipping` for sending this package to a cluster
that lacks it, and `errors` for the errors.
"""
from llmserve_nb.cluster.app import AppHandle
from llmserve_nb.cluster.client import Cluster, check_version_skew
from llmserve_nb.cluster.errors import CONNECT_TIMEOUT_S, ClusterError, DeployError
from llmserve_nb.cluster.status import AppStatus
from llmserve_nb.cluster.targets import connect, read_ray_token

__all__ = [
    "CONNECT_TIMEOUT_S",
    "AppHandle",
    "AppStatus",
    "Cluster",
    "ClusterError",
    "DeployError",
    "check_version_skew",
    "connect",
    "read_ray_token",
]
