"""A capacity planner: how many replicas, with which settings, serve R requests per second of a workload
within an SLO, and what goes in the manifests (notebook 07).

1. `search_configs` (`search`): on one running replica, for each candidate of the knobs Serve changes in
   place, the highest open-loop rate at which at least the SLO's attainment share of requests is good
   (`find_max_rate`: a geometric ramp, then bisection, within a time budget). The best config wins.
2. `make_plan` (`plan`): replicas for the target rate with headroom, `target_ongoing_requests` from Little's
   law, min/max replicas and the CPUs/GPUs they take, each with its reason (`CapacityPlan.rationale`);
   `CapacityPlan.write` renders the AppConfig YAML and its Kubernetes overlay (`llmserve_nb.k8s`'s renderer).
3. `verify_plan` (`verify`): the plan deployed on the cluster at hand and driven at the target rate under
   `bench.run_observed`: the share of good requests, and the replicas the autoscaler reached against the plan.

`view` holds the form, the Pareto plot and the replica timeline.
"""
from llmserve_nb.experiments.capacity_plan.plan import (
    CapacityPlan,
    e2e_at,
    littles_law_target,
    make_plan,
    replicas_for,
)
from llmserve_nb.experiments.capacity_plan.search import (
    LIVE_KNOBS,
    ConfigTrial,
    Probe,
    RateSearch,
    SearchResult,
    candidate_grid,
    find_max_rate,
    measure_rate,
    search_configs,
)
from llmserve_nb.experiments.capacity_plan.verify import Verification, verify_plan
from llmserve_nb.experiments.capacity_plan.view import PlannerForm, plot_pareto, plot_replicas

__all__ = [
    "LIVE_KNOBS",
    "CapacityPlan",
    "ConfigTrial",
    "PlannerForm",
    "Probe",
    "RateSearch",
    "SearchResult",
    "Verification",
    "candidate_grid",
    "e2e_at",
    "find_max_rate",
    "littles_law_target",
    "make_plan",
    "measure_rate",
    "plot_pareto",
    "plot_replicas",
    "replicas_for",
    "search_configs",
    "verify_plan",
]
