"""The capacity planner's arithmetic and search on known inputs (no Ray): replicas with headroom, Little's
law, the rate search on a fake replica with a known knee, the plan, its files, and what it refuses."""
from __future__ import annotations

import math

import pytest
import yaml

from llmserve_nb.bench import BenchRun, RequestResult, Workload
from llmserve_nb.bench.slo import SLO
from llmserve_nb.config import AppConfig
from llmserve_nb.experiments.capacity_plan import (
    ConfigTrial,
    Probe,
    RateSearch,
    SearchResult,
    candidate_grid,
    e2e_at,
    find_max_rate,
    littles_law_target,
    make_plan,
    replicas_for,
    search_configs,
    verify_plan,
)


def probe(rate: float, met: bool, e2e_s: float = 1.0) -> Probe:
    return Probe(rate=rate, requests=10, good=10 if met else 5, attainment=1.0 if met else 0.5, met=met,
                 e2e_mean_s=e2e_s)


def knee(at: float, calls: list[float] | None = None):
    """A replica that holds every rate up to `at` and none above."""
    def measure(rate: float) -> Probe:
        if calls is not None:
            calls.append(rate)
        return probe(rate, rate <= at)
    return measure


@pytest.mark.parametrize("target, per_replica, headroom, expected", [
    (10.0, 4.0, 0.2, 4),   # 10 / 3.2 = 3.125
    (6.4, 4.0, 0.2, 2),    # exactly 2.0 (6.4 / 3.2 is 2.0000000000000004 in floats): not 3
    (8.0, 4.0, 0.0, 2),
    (0.5, 4.0, 0.5, 1),
    (4.0, 4.0, 0.2, 2),    # the rate one replica just holds needs two with any headroom
])
def test_replicas_for_a_target_with_headroom(target, per_replica, headroom, expected):
    assert replicas_for(target, per_replica, headroom) == expected


@pytest.mark.parametrize("args", [(0.0, 4.0, 0.2), (1.0, 0.0, 0.2), (1.0, 4.0, 1.0), (1.0, 4.0, -0.1)])
def test_replicas_for_refuses_impossible_inputs(args):
    with pytest.raises(ValueError):
        replicas_for(*args)


def test_littles_law():
    assert littles_law_target(2.0, 1.5) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        littles_law_target(2.0, 0.0)


def test_e2e_is_interpolated_between_the_probes_that_held():
    probes = [probe(1.0, True, 1.0), probe(2.0, True, 1.2), probe(4.0, True, 2.0), probe(8.0, False, 9.0)]
    assert e2e_at(probes, 3.0) == pytest.approx(1.6)
    assert e2e_at(probes, 0.5) == pytest.approx(1.0)   # below the lowest: the unloaded latency
    assert e2e_at(probes, 6.0) == pytest.approx(2.0)   # a failed probe's latency is never used
    with pytest.raises(ValueError, match="no probe held"):
        e2e_at([probe(1.0, False)], 1.0)


def test_ramp_then_bisection_finds_the_knee_within_the_tolerance():
    calls: list[float] = []
    found = find_max_rate(knee(3.3, calls), start_rate=0.5, growth=2.0, rel_tol=0.1)
    assert calls[:4] == [0.5, 1.0, 2.0, 4.0]  # the ramp doubles until a rate fails
    assert found.stopped == "converged"
    assert 3.3 / 1.1 <= found.max_rate <= 3.3
    assert found.max_rate == max(p.rate for p in found.probes if p.met)
    failed = min(p.rate for p in found.probes if not p.met)
    assert failed / found.max_rate <= 1.1 and failed > 3.3


def test_a_failing_start_ramps_down_and_gives_up_below_the_floor():
    found = find_max_rate(knee(0.3), start_rate=2.0, growth=2.0, rel_tol=0.5)
    assert [p.rate for p in found.probes][:4] == [2.0, 1.0, 0.5, 0.25]
    assert 0.2 <= found.max_rate <= 0.3 and found.stopped == "converged"
    nothing = find_max_rate(knee(0.01), start_rate=2.0, growth=2.0)
    assert nothing.max_rate == 0.0 and nothing.stopped == "none held"
    assert min(p.rate for p in nothing.probes) >= 2.0 / 8


def test_a_config_that_fails_at_the_best_rate_so_far_is_dropped_after_one_probe():
    calls: list[float] = []
    found = find_max_rate(knee(3.0, calls), start_rate=0.5, beat=4.0)
    assert calls == [4.0] and found.max_rate == 0.0 and found.stopped == "pruned"
    better = find_max_rate(knee(9.0), start_rate=0.5, beat=4.0, rel_tol=0.1)
    assert better.probes[0].rate == 4.0 and 9.0 / 1.1 <= better.max_rate <= 9.0


def test_the_budget_stops_the_search_between_probes():
    now = [0.0]

    def slow(rate: float) -> Probe:
        now[0] += 10.0  # every probe takes 10 s
        return probe(rate, rate <= 100.0)

    found = find_max_rate(slow, start_rate=1.0, deadline=25.0, clock=lambda: now[0])
    assert len(found.probes) == 3 and found.stopped == "budget" and found.max_rate == 4.0
    capped = find_max_rate(knee(100.0), start_rate=1.0, max_probes=2)
    assert len(capped.probes) == 2 and capped.max_rate == 2.0


def test_candidate_grid_is_every_combination_of_the_given_knobs():
    assert candidate_grid() == [{}]
    assert candidate_grid(batch_sizes=[4, 16], max_ongoing=[8]) == [
        {"batching.max_batch_size": 4, "deployment.max_ongoing_requests": 8},
        {"batching.max_batch_size": 16, "deployment.max_ongoing_requests": 8},
    ]


def test_a_probe_counts_every_request_sent_and_only_the_good_ones():
    def rr(i, status, e2e):
        return RequestResult(index=i, status=status, start_s=float(i), ttft_s=0.1, e2e_s=e2e, output_tokens=8,
                             streamed=True)

    results = [rr(0, "ok", 0.5), rr(1, "ok", 0.6), rr(2, "ok", 3.0), rr(3, "incomplete", math.nan)]
    run = BenchRun(label="p", url="http://x", model="m", workload=Workload(), concurrency=None, rate=2.0,
                   duration_s=3.0, results=results)
    p = Probe.from_run(run, SLO(e2e_s=1.0, attainment=0.5))
    assert (p.requests, p.good, p.attainment, p.met) == (4, 2, 0.5, True)
    assert p.goodput == pytest.approx(1.0) and p.e2e_mean_s == pytest.approx((0.5 + 0.6 + 3.0) / 3)
    assert not Probe.from_run(run, SLO(e2e_s=1.0)).met
    # Sent after the window (into the drain, which cuts it short): load, not judged.
    run.results[3].start_s = 5.5
    late = Probe.from_run(run, SLO(e2e_s=1.0, attainment=0.5), sent=(0.0, 5.0))
    assert (late.requests, late.good) == (3, 2)


def search_result(lam: float = 4.0) -> SearchResult:
    config = AppConfig().with_overrides(**{"deployment.num_cpus": 0.5, "batching.max_batch_size": 16})
    held = [probe(1.0, True, 1.0), probe(2.0, True, 1.0), probe(lam, True, 1.5), probe(lam * 1.2, False, 5.0)]
    slower = ConfigTrial("max_batch_size=4", {"batching.max_batch_size": 4}, AppConfig(),
                         RateSearch(2.0, [probe(2.0, True)], "converged"))
    best = ConfigTrial("max_batch_size=16", {"batching.max_batch_size": 16}, config,
                       RateSearch(lam, held, "converged"))
    return SearchResult(SLO.parse("e2e=4s"), Workload(input_tokens=16, output_tokens=16), 5.0, [slower, best])


def test_the_plan_derives_replicas_autoscaling_and_resources():
    plan = make_plan(search_result(4.0), 10.0, headroom=0.2, autoscaling={"upscale_delay_s": 2.0})
    assert plan.best == "max_batch_size=16" and plan.per_replica_rate == 4.0
    assert plan.replicas == 4 and plan.rate_per_replica == pytest.approx(2.5)
    assert plan.e2e_s == pytest.approx(1.125)  # between 1.0 s at 2 req/s and 1.5 s at 4 req/s
    assert plan.target_ongoing_requests == pytest.approx(2.81)  # 2.5 req/s x 1.125 s
    assert (plan.min_replicas, plan.max_replicas, plan.cpus, plan.gpus) == (1, 4, 2.0, 0.0)
    auto = plan.config.deployment.autoscaling
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 2.81)
    assert auto.upscale_delay_s == 2.0  # the extra autoscaling fields pass through
    assert plan.config.batching.max_batch_size == 16  # the best config, not the first
    steps = plan.rationale
    assert steps.loc["replicas N", "value"] == 4 and "ceil" in steps.loc["replicas N", "why"]
    assert steps.loc["target_ongoing_requests", "value"] == pytest.approx(2.81)


def test_without_a_target_the_plan_is_for_a_share_of_what_one_replica_holds():
    plan = make_plan(search_result(4.0), None, headroom=0.2)
    assert plan.target_rate == 4.0 and plan.replicas == 2
    assert plan.target_ongoing_requests == pytest.approx(2.0 * 1.0)  # 2 req/s per replica, 1 s at 2 req/s
    half = make_plan(search_result(4.0), None, headroom=0.6, default_share=0.5)
    assert half.target_rate == 2.0 and half.replicas == 2  # 2 / (4 x 0.4) = 1.25
    assert "0.5 x the rate one replica held" in half.rationale.loc["target rate R", "why"]


def test_a_search_where_nothing_held_has_no_plan():
    result = search_result()
    for t in result.trials:
        t.search.max_rate = 0.0
    with pytest.raises(ValueError, match="no config held"):
        make_plan(result, 1.0)


def test_the_plan_writes_an_appconfig_that_loads_back_and_its_overlay(tmp_path):
    plan = make_plan(search_result(4.0), 10.0)
    paths = plan.write(tmp_path / "plan", namespace="team-a")
    assert AppConfig.from_file(paths["app_yaml"]) == plan.config
    text = paths["app_yaml"].read_text()
    assert "max_replicas: 4" in text and "target_ongoing_requests: 2.81" in text
    (service,) = yaml.safe_load_all((paths["k8s"] / "rayservice.yaml").read_text())
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    (deployment,) = served["deployments"]
    assert deployment["autoscaling_config"]["max_replicas"] == 4
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == 2.81
    assert deployment["user_config"]["max_batch_size"] == 16
    assert (paths["k8s"] / "kustomization.yaml").is_file() and paths["rationale"].is_file()


class _ConfigOnly:
    """An app handle whose config is all the search reads before it sends anything."""

    def __init__(self, config: AppConfig):
        self.config = config

    def __getattr__(self, name):
        raise AssertionError(f"the search touched app.{name} before refusing the candidates")


@pytest.mark.parametrize("candidate, match", [
    ({"engine.max_num_seqs": 32}, "cannot change live"),
    ({"deployment.num_cpus": 2}, "cannot change live"),
])
def test_a_candidate_that_would_reload_the_model_is_refused_before_any_request(candidate, match):
    with pytest.raises(ValueError, match=match):
        search_configs(_ConfigOnly(AppConfig()), Workload(), SLO(e2e_s=1.0), [{}, candidate])


def test_a_vllm_app_cannot_search_batching():
    vllm = AppConfig().with_overrides(**{"engine.backend": "vllm", "engine.model_source": "Qwen/Qwen2.5-0.5B-Instruct"})
    with pytest.raises(ValueError, match="cannot change batching live"):
        search_configs(_ConfigOnly(vllm), Workload(), SLO(e2e_s=1.0), [{"batching.max_batch_size": 4}])


def test_verification_refuses_a_plan_the_cluster_cannot_hold():
    class OneCpu:
        def nodes(self):
            return [{"state": "ALIVE", "CPU": 1.0}, {"state": "DEAD", "CPU": 8.0}]

        def deploy(self, *a, **kw):
            raise AssertionError("deployed a plan that does not fit")

    plan = make_plan(search_result(4.0), 10.0)  # 4 replicas x 0.5 CPU
    with pytest.raises(ValueError, match="needs 4 replicas"):
        verify_plan(OneCpu(), plan, Workload(), SLO(e2e_s=4.0))


@pytest.mark.parametrize("rate, judged_s", [(4.0, 30.0), (0.5, 40.0)])
def test_verification_at_a_low_rate_runs_long_enough_to_judge_enough_requests(monkeypatch, rate, judged_s):
    from llmserve_nb.experiments.capacity_plan import verify as verify_mod

    class Sent(Exception):
        pass

    def run_benchmark(url, wl, **kw):
        assert kw["rate"] == rate
        raise Sent(wl)

    class Cluster:
        def nodes(self):
            return [{"state": "ALIVE", "CPU": 64.0}]

        def deploy(self, config, progress=None):
            return type("App", (), {"base_url": "http://x", "api_key": None, "model": "m"})()

    monkeypatch.setattr(verify_mod, "run_benchmark", run_benchmark)
    monkeypatch.setattr(verify_mod, "run_observed", lambda load, *a, **kw: load())
    plan = make_plan(search_result(4.0), rate)
    assert plan.target_rate == rate
    with pytest.raises(Sent) as sent:
        verify_plan(Cluster(), plan, Workload(), SLO(e2e_s=4.0), duration_s=30.0, warmup_s=10.0, min_requests=20)
    # 20 requests expected in the judged window: 30 s at 4 req/s already, 40 s at 0.5 req/s.
    assert sent.value.args[0].num_requests == math.ceil(rate * (10.0 + judged_s))


def test_the_form_reads_back_parsed_and_flags_a_bad_slo():
    from llmserve_nb.experiments.capacity_plan import PlannerForm

    form = PlannerForm({"ttft": "1s", "e2e": "5s"}, None, headroom=0.3, budget_s=60)
    assert form.slo == SLO(ttft_s=1.0, e2e_s=5.0) and form.target_rate is None
    assert form.values() == {"slo": "ttft=1000ms,e2e=5000ms,attainment=99%", "target_rate": None, "headroom": 0.3,
                             "budget_s": 60.0}
    form.rate.value = 2.5
    form.slo_text.value = "ttft=1s,bogus=2"
    assert form.target_rate == 2.5 and "unknown SLO key 'bogus'" in form.note.value.replace("&#x27;", "'")


def test_the_pareto_plot_has_one_line_per_config_and_marks_the_best():
    import matplotlib

    matplotlib.use("Agg")
    from llmserve_nb.experiments.capacity_plan import plot_pareto

    ax = plot_pareto(search_result(4.0))
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["all good", "max_batch_size=4: 2.00 req/s (converged)",
                      "max_batch_size=16: 4.00 req/s (converged)"]
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [4.0]
