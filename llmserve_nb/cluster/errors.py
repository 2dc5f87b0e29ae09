"""The errors every part of `llmserve_nb.cluster` raises, and the connect timeout they all share.

One exception type lets a notebook catch any failure to reach or use the cluster with a single
`except ClusterError` (`DeployError` singles out a deploy that Serve refused or did not finish,
`KubeRayError` a KubeRay cluster that cannot be found or reached); they live apart from the modules
that raise them so that those need not import each other, and `CONNECT_TIMEOUT_S` sits here for the
same reason: the cluster client and the app handle both bound every connection attempt with it.
"""

# An address that never answers should fail in seconds, whatever the read timeout of the call.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused us, or is not what we expected."""


class DeployError(ClusterError):
    """Serve could not deploy the application (or did not finish in time)."""


class KubeRayError(ClusterError):
    """Anything that stops us from finding or reaching a KubeRay cluster; the message says what and where."""
