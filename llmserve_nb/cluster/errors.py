"""The errors every part of `llmserve_nb.cluster` raises, and the connect timeout they all share.

One exception type lets a notebook, or a caller such as `llmserve_nb.cluster.kuberay`, catch any failure to
reach or use the cluster with a single `except ClusterError` (`DeployError` singles out a deploy that
Serve refused or did not finish); they live apart from the cluster client and the app handle so that
both can raise them without importing each other, and `CONNECT_TIMEOUT_S` sits here for the same
reason: both bound every connection attempt with it.
"""

# An address that never answers should fail in seconds, whatever the read timeout of the call.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused us, or is not what we expected."""


class DeployError(ClusterError):
    """Serve could not deploy the application (or did not finish in time)."""
