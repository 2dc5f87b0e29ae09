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

Modules: `config` (the autoscaling configs, local and KubeRay's), `local` (the cluster and its
processes), `experiment` (`scale_out_and_back` and its plot; notebook 06).
"""
from llmserve_nb.experiments.cluster_autoscaling.config import (
    HEAD_NODE_TYPE,
    WORKER_NODE_TYPE,
    autoscaling_config,
    correspondence,
    kuberay_autoscaling_config,
)
from llmserve_nb.experiments.cluster_autoscaling.experiment import cluster_sampler, plot_timeline, scale_out_and_back
from llmserve_nb.experiments.cluster_autoscaling.local import (
    LocalAutoscalingCluster,
    cluster_processes,
    stop_processes,
)

__all__ = [
    "HEAD_NODE_TYPE",
    "WORKER_NODE_TYPE",
    "LocalAutoscalingCluster",
    "autoscaling_config",
    "cluster_processes",
    "cluster_sampler",
    "correspondence",
    "kuberay_autoscaling_config",
    "plot_timeline",
    "scale_out_and_back",
    "stop_processes",
]
