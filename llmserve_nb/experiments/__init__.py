"""Experiments the notebooks run against a live app: overload and replica failure (`reliability`),
autoscaling policies compared (`autoscaling`), Ray's cluster autoscaler on one machine
(`cluster_autoscaling`). Each drives load through `llmserve_nb.bench` and reports what it observed."""
