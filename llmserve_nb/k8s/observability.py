"""Production observability, rendered from the same configs: PodMonitors for Ray's metrics port, PrometheusRule
alerts for the backend each app selects, and a Grafana dashboard (JSON plus a ConfigMap for Grafana's sidecar).

Engine metrics are `<prefix>_*`, each backend's `metric_prefix` and `engine_metrics`: `ray_llmserve_*` (this
package's engine, names from `llmserve_nb.observability.promql`) or `ray_vllm_*` (vLLM's own metrics through
Ray). They share names, so one dashboard serves every backend through the `prefix` template variable, and
all carry `model_name`, the only label vLLM's have. Serve's `ray_serve_*` names are Ray 2.60's
(ray/dashboard/modules/metrics/dashboards/serve_*_panels.py and ray/serve/_private/).
`all_promql_expressions()` lists every PromQL expression shipped here, ready to run against a Prometheus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llmserve_nb.backends import Backend, all_backends, backend_for, get_backend
from llmserve_nb.config import AppConfig
from llmserve_nb.k8s.hpa import prometheus_adapter_values
from llmserve_nb.k8s.options import NAME_LABEL, ClusterSpec, ManifestError
from llmserve_nb.k8s.profiles import profile

MONITORING_API = "monitoring.coreos.com/v1"
DASHBOARD_UID = "llmserve-nb"
DASHBOARD_FILE = "llmserve-nb.json"
_PREFIX_VAR = "${prefix}"


def _engine_metric_names(expr: str, backend: Backend) -> set[str]:
    """The engine metrics `expr` names, as base names (without a histogram's _bucket/_sum/_count)."""
    names = re.findall(rf"\b{backend.metric_prefix}_[a-z0-9_]+", expr)
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def _check_engine_metrics(exprs: dict[str, str], backend: Backend) -> None:
    """Fail rendering when an expression names an engine metric the backend does not export."""
    for where, expr in exprs.items():
        unknown = _engine_metric_names(expr, backend) - backend.engine_metrics
        if unknown:
            raise ManifestError(f"{where}: {sorted(unknown)} are not metrics the {backend.name} backend exports "
                                f"({sorted(backend.engine_metrics)})")


# ---- scraping --------------------------------------------------------------------------------------
def pod_monitors(spec: ClusterSpec) -> list[dict[str, Any]]:
    """Head and workers of every llmserve-nb Ray cluster in the namespace (the HPA workers included)."""

    def monitor(role: str, operator: str) -> dict[str, Any]:
        return {
            "apiVersion": MONITORING_API,
            "kind": "PodMonitor",
            "metadata": {
                "name": f"llmserve-nb-ray-{role}",
                "labels": {**NAME_LABEL, **spec.prometheus_selector},
            },
            "spec": {
                "selector": {
                    "matchLabels": dict(NAME_LABEL),
                    # NotIn also matches pods without the label: Ray workers that KubeRay does not manage.
                    "matchExpressions": [{"key": "ray.io/node-type", "operator": operator, "values": ["head"]}],
                },
                "podMetricsEndpoints": [
                    {
                        "port": "metrics",
                        "path": "/metrics",
                        # Which cluster a series came from, so old and new clusters stay apart during upgrades.
                        "relabelings": [
                            {
                                "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                "targetLabel": "ray_io_cluster",
                            }
                        ],
                    }
                ],
            },
        }

    return [monitor("head", "In"), monitor("workers", "NotIn")]


# ---- alerts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    name: str
    application: str
    signal: str  # what the alert watches; returns data whenever the app serves traffic
    condition: str  # appended to the signal to make the rule's expr
    duration: str
    severity: str
    summary: str
    description: str

    @property
    def expr(self) -> str:
        return f"{self.signal} {self.condition}"

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.duration,
            # application keeps the rules of several apps apart (promtool rejects duplicates) and routes alerts.
            "labels": {"severity": self.severity, "application": self.application},
            "annotations": {"summary": self.summary, "description": self.description},
        }


def alerts(app: AppConfig, spec: ClusterSpec | None = None) -> list[Alert]:
    """The alerts for one application, on the metrics of the backend it selects."""
    a = (spec or ClusterSpec()).alerts
    backend = backend_for(app)
    p = backend.metric_prefix
    sel = backend.engine_selector(app)
    by_model = "namespace, model_name"
    by_app = "namespace, application"
    http, status = backend.http_requests
    app_sel = f'application="{app.name}"'
    total = f"sum by ({by_app}) (rate({http}{{{app_sel}}}[{a.window}]))"
    errors = f'sum by ({by_app}) (rate({http}{{{app_sel},{status}=~"5.."}}[{a.window}]))'
    waiting = f"{p}_num_requests_waiting{{{sel}}}"
    out = [
        Alert(
            "LLMServeTTFTHigh", app.name,
            f"histogram_quantile(0.99, sum by ({by_model}, le) "
            f"(rate({p}_time_to_first_token_seconds_bucket{{{sel}}}[{a.window}])))",
            f"> {a.ttft_p99_s}",
            a.latency_for,
            "warning",
            f"{app.name}: p99 time to first token above {a.ttft_p99_s}s",
            f"p99 TTFT of {{{{ $labels.model_name }}}} in {{{{ $labels.namespace }}}} is {{{{ $value }}}}s "
            f"(target {a.ttft_p99_s}s) for {a.latency_for}: replicas are saturated or prompts grew.",
        ),
        Alert(
            "LLMServeErrorRatioHigh", app.name,
            # `or ... * 0`: a 0 of the same labels while no 5xx series exists yet, so the ratio is 0, not absent.
            f"({errors} or {total} * 0) / {total}",
            f"> {a.error_ratio}",
            a.errors_for,
            "critical",
            f"{app.name}: more than {a.error_ratio:.0%} of requests fail with 5xx",
            f"{{{{ $value | humanizePercentage }}}} of {{{{ $labels.application }}}}'s requests answered 5xx "
            f"over {a.window} (backpressure refusals count when its status code is 503).",
        ),
        Alert(
            "LLMServeQueueGrowing", app.name,
            f"sum by ({by_model}) (deriv({waiting}[{a.queue_growing_for}]))",
            f"> 0 and on ({by_model}) sum by ({by_model}) ({waiting}) > 0",
            a.queue_growing_for,
            "warning",
            f"{app.name}: requests waiting in the engine keep growing",
            f"num_requests_waiting of {{{{ $labels.model_name }}}} has grown for {a.queue_growing_for}: "
            "arrivals exceed what the replicas decode.",
        ),
    ]
    if app.deployment.autoscaling is not None:
        top = app.deployment.autoscaling.max_replicas
        out.append(
            Alert(
                "LLMServeReplicasAtMax", app.name,
                # The controller's target, per cluster; max() over the old and new cluster during an upgrade.
                f"max by ({by_app}, deployment) "
                f'(ray_serve_autoscaling_target_replicas{{{app_sel},deployment="{backend.model_deployment(app)}"}})',
                f">= {top}",
                a.replicas_at_max_for,
                "warning",
                f"{app.name}: Serve autoscaling has wanted its maximum of {top} replicas for {a.replicas_at_max_for}",
                "No headroom left: raise autoscaling.max_replicas (and the worker group's maxReplicas) or add GPUs.",
            )
        )
    _check_engine_metrics({f"alert {x.name} of {app.name}": x.expr for x in out}, backend)
    return out


def prometheus_rule(apps: list[AppConfig], spec: ClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": {
            "name": "llmserve-nb-alerts",
            "labels": {**NAME_LABEL, **spec.prometheus_selector},
        },
        "spec": {
            "groups": [
                {"name": f"llmserve-nb.{app.name}", "rules": [x.rule() for x in alerts(app, spec)]} for app in apps
            ]
        },
    }


# ---- dashboard -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    description: str

    def exprs(self, backend: Backend) -> list[str]:
        return [e.replace(_PREFIX_VAR, backend.metric_prefix) for e, _ in self.targets]

    def serves(self, backend: Backend) -> bool:
        """Whether the backend exports every engine metric of the panel."""
        return all(_engine_metric_names(e, backend) <= backend.engine_metrics for e in self.exprs(backend))


_ENG = 'model_name=~"$model_name"'
_APP = 'application=~"$application"'
_RATE = "$__rate_interval"


def _quantiles(metric: str, sel: str, qs: tuple[float, ...], by: str = "le") -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{_RATE}])))", f"p{round(q * 100)}")
        for q in qs
    )


def _engine_panels() -> list[_Panel]:
    p = _PREFIX_VAR
    return [
        _Panel("Time to first token", "s", _quantiles(f"{p}_time_to_first_token_seconds", _ENG, (0.5, 0.9, 0.99)),
               "From arrival to the first generated token, queueing included."),
        _Panel("Time per output token", "s",
               _quantiles(f"{p}_request_time_per_output_token_seconds", _ENG, (0.5, 0.99)),
               "Decode speed one request sees."),
        _Panel("End-to-end request latency", "s", _quantiles(f"{p}_e2e_request_latency_seconds", _ENG, (0.5, 0.99)),
               "Whole requests, from arrival to the last token."),
        _Panel("Token throughput", "none", (
            (f"sum(rate({p}_generation_tokens_total{{{_ENG}}}[{_RATE}]))", "generated tok/s"),
            (f"sum(rate({p}_prompt_tokens_total{{{_ENG}}}[{_RATE}]))", "prompt tok/s"),
        ), "Tokens per second over all replicas."),
        _Panel("Requests running and waiting", "none", (
            (f"sum({p}_num_requests_running{{{_ENG}}})", "running"),
            (f"sum({p}_num_requests_waiting{{{_ENG}}})", "waiting"),
        ), "In the engines' batches, and queued in the engines for a slot."),
        _Panel("KV cache usage", "percentunit", (
            (f"max by (model_name) ({p}_kv_cache_usage_perc{{{_ENG}}})", "{{model_name}} (fullest replica)"),
        ), "Share of the KV cache in use; near 1, new requests wait."),
        _Panel("Finished requests by reason", "reqps", (
            (f"sum by (finished_reason) (rate({p}_request_success_total{{{_ENG}}}[{_RATE}]))", "{{finished_reason}}"),
        ), "stop, length, abort (client gone), error."),
        _Panel("Admission batch size", "none",
               _quantiles(f"{p}_admission_batch_size", _ENG, (0.5, 0.99)),
               "Requests admitted together (engines that form admission batches: this package's)."),
    ]


def _serve_panels() -> list[_Panel]:
    http = "ray_serve_num_http_requests_total"
    total = f"sum(rate({http}{{{_APP}}}[{_RATE}]))"
    errors = f'sum(rate({http}{{{_APP},status_code=~"5.."}}[{_RATE}]))'
    by = "application, deployment"
    return [
        _Panel("HTTP requests by status", "reqps", (
            (f"sum by (application, status_code) (rate({http}{{{_APP}}}[{_RATE}]))", "{{application}} {{status_code}}"),
        ), "Answers of Serve's HTTP proxies."),
        _Panel("HTTP 5xx ratio", "percentunit", (
            # `or ... * 0`: 0 while no 5xx series exists yet.
            (f"({errors} or {total} * 0) / {total}", "5xx"),
        ), "Share of requests answered 5xx, backpressure refusals included when they use 503."),
        _Panel("HTTP latency (Serve proxy)", "ms",
               _quantiles("ray_serve_http_request_latency_ms", _APP, (0.5, 0.99)),
               "Measured at Serve's proxy: whole responses, streams included."),
        _Panel("Replicas", "none", (
            (f"sum by ({by}) (ray_serve_deployment_replica_healthy{{{_APP}}})", "healthy {{deployment}}"),
            (f"max by ({by}) (ray_serve_autoscaling_target_replicas{{{_APP}}})", "target {{deployment}}"),
        ), "Healthy replicas and the controller's target."),
        _Panel("Serve queue and ongoing requests", "none", (
            (f"sum by ({by}) (ray_serve_deployment_queued_queries{{{_APP}}})", "queued in routers {{deployment}}"),
            (f"sum by ({by}) (ray_serve_num_ongoing_requests_at_replicas{{{_APP}}})", "ongoing {{deployment}}"),
        ), "Waiting for a replica slot (max_ongoing_requests) and running in replicas."),
        _Panel("Replica processing latency", "ms",
               _quantiles("ray_serve_deployment_processing_latency_ms", _APP, (0.5, 0.99)),
               "Time inside the replica per request."),
    ]


def _prom_target(expr: str, legend: str, ref: int) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
            "refId": chr(ord("A") + ref)}


def grafana_dashboard(backend: str = "transformers") -> dict[str, Any]:
    """The dashboard of every backend; `backend` picks the default of its `prefix` variable."""
    for panel in _engine_panels():
        # A panel no backend serves names a metric nobody exports (a typo): it would stay empty.
        if not any(panel.serves(b) for b in all_backends()):
            raise ManifestError(f"dashboard panel {panel.title!r}: no backend exports all of "
                                f"{[e for e, _ in panel.targets]}")
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row in (("Engine: ${prefix}_*", _engine_panels()), ("Ray Serve", _serve_panels())):
        panels.append({"type": "row", "title": row_title, "collapsed": False, "id": len(panels) + 1,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, panel in enumerate(row):
            panels.append({
                "type": "timeseries",
                "id": len(panels) + 1,
                "title": panel.title,
                "description": panel.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [_prom_target(e, legend, n) for n, (e, legend) in enumerate(panel.targets)],
            })
        y += 8 * ((len(row) + 1) // 2)
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": ds, "definition": query,
                "query": {"query": query, "refId": name}, "refresh": 2, "includeAll": True, "multi": True,
                "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}

    default = get_backend(backend).metric_prefix
    prefixes = [b.metric_prefix for b in all_backends()]
    return {
        "uid": DASHBOARD_UID,
        "title": "llmserve-nb",
        "description": "LLM serving on Ray Serve: engine metrics (this package's or vLLM's) and Serve's own.",
        "tags": ["llmserve-nb", "ray", "serve"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "prefix", "label": "Engine metrics", "type": "custom",
             "query": ",".join(prefixes),
             "current": {"text": default, "value": default},
             "options": [{"text": v, "value": v, "selected": v == default} for v in prefixes]},
            query_var("application", "Application", "label_values(ray_serve_deployment_replica_healthy, application)"),
            query_var("model_name", "Model", "label_values(${prefix}_num_requests_running, model_name)"),
        ]},
        "panels": panels,
    }


def dashboard_json(backend: str = "transformers") -> str:
    return json.dumps(grafana_dashboard(backend), indent=2) + "\n"


def dashboard_configmap(spec: ClusterSpec, backend: str = "transformers") -> dict[str, Any]:
    """The dashboard for Grafana's sidecar (kube-prometheus-stack loads ConfigMaps labelled grafana_dashboard).
    Its namespace is Grafana's (`spec.monitoring_namespace`), set by the grafana/ kustomization."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "llmserve-nb-grafana-dashboard",
            "labels": {**NAME_LABEL, "grafana_dashboard": "1"},
        },
        "data": {DASHBOARD_FILE: dashboard_json(backend)},
    }


# ---- every expression, for a real Prometheus ----------------------------------------------------------
def _substitute(expr: str, prefix: str, application: str, model_name: str, rate_window: str) -> str:
    return (
        expr.replace(_PREFIX_VAR, prefix)
        .replace("$application", application)
        .replace("$model_name", model_name)
        .replace("$__rate_interval", rate_window)
    )


def all_promql_expressions(
    backend: str | None = None,
    *,
    app: AppConfig | None = None,
    rate_window: str = "1m",
    with_thresholds: bool = False,
) -> dict[str, str]:
    """Every PromQL expression of the dashboard, the alert rules and the HPA's prometheus-adapter rule,
    template variables substituted, keyed `dashboard/<panel>/<legend>`, `alert/<name>`, `hpa/<rule>`.

    `app` is the application under test (default: the GPU profile, app `llm`): alerts are rendered for it,
    and `$application`/`$model_name` become its name and served model name. `backend` defaults to the app's
    (`$prefix` becomes its `metric_prefix`); panels on metrics that backend does not export are left out.
    Alerts give their signal, which returns data whenever the app serves traffic, unless `with_thresholds`
    asks for the rule's full expr (empty until the alert fires). `rate_window` replaces `$__rate_interval`;
    Ray reports metrics every 10 s, so keep it at 30 s or more.
    """
    app = app or profile("gpu")
    chosen = get_backend(backend or app.engine.backend)
    if app.engine.backend != chosen.name:
        app = app.model_copy(update={"engine": app.engine.model_copy(update={"backend": chosen.name})})
    out: dict[str, str] = {}
    for panel in _engine_panels() + _serve_panels():
        if panel.serves(chosen):
            for expr, legend in panel.targets:
                key = f"dashboard/{panel.title}/{legend}"
                out[key] = _substitute(expr, chosen.metric_prefix, app.name, app.engine.model_name, rate_window)
    for alert in alerts(app):
        out[f"alert/{alert.name}"] = alert.expr if with_thresholds else alert.signal
    for rule in prometheus_adapter_values()["rules"]["external"]:
        matchers = f'application="{app.name}"'
        out[f"hpa/{rule['name']['as']}"] = rule["metricsQuery"].replace("<<.LabelMatchers>>", matchers)
    return out
