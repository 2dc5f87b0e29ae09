"""Experiments the notebooks run against a live app: overload and replica failure (`reliability`),
autoscaling policies compared (`autoscaling`), Ray's cluster autoscaler on one machine
(`cluster_autoscaling`). Each runs its load and its observations through `llmserve_nb.bench.run_observed`
and reports what it saw."""
