"""Reliability experiments shared by `notebooks/04_reliability.ipynb`, `benchmarks/replica_failure.py`
and `tests/test_reliability.py`: overload bursts, replica kills under load, engine-loop failures,
updates under load, and the figures that say how the app behaved (accepted, succeeded, failed by
kind, hung, recovery time).

- `probes`: one request, a burst at one instant, the backpressure check, the small-queue app;
- `faults`: killing a replica or its engine loop, and waiting for the replacement;
- `load`: a steady load with actions fired into it (`run_load`) and the figures and plot of it.

Every client call has a timeout, so an experiment never hangs on a dead app.
"""
from llmserve_nb.experiments.reliability.faults import (
    INJECTED_FAULT,
    kill_and_recover,
    kill_engine_loop,
    kill_replica,
    replicas,
    running_ids,
    wait_replaced,
    wait_served_by,
)
from llmserve_nb.experiments.reliability.load import failure_summary, per_second, plot_timeline, run_load
from llmserve_nb.experiments.reliability.probes import (
    BACKPRESSURE_STATUSES,
    backpressure_check,
    burst,
    probe,
    small_queue_config,
)

__all__ = [
    "BACKPRESSURE_STATUSES",
    "INJECTED_FAULT",
    "backpressure_check",
    "burst",
    "failure_summary",
    "kill_and_recover",
    "kill_engine_loop",
    "kill_replica",
    "per_second",
    "plot_timeline",
    "probe",
    "replicas",
    "run_load",
    "running_ids",
    "small_queue_config",
    "wait_replaced",
    "wait_served_by",
]
