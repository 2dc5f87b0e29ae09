"""Serve's application status, parsed once from the dashboard's REST answer
(`GET /api/serve/applications/`) into typed records, so no caller digs through the raw dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOT_DEPLOYED", "AppStatus", "Deployment", "Replica", "parse_serve_details", "routing_of"]

# The status of an application Serve does not know (never deployed, or deleted).
NOT_DEPLOYED = "NOT_DEPLOYED"


@dataclass(frozen=True)
class Replica:
    replica_id: str
    state: str  # STARTING, RUNNING, STOPPING, ...
    node_id: str = ""
    node_ip: str = ""
    actor_name: str = ""
    pid: int | None = None

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Replica:
        return cls(replica_id=str(raw.get("replica_id") or ""), state=str(raw.get("state") or ""),
                   node_id=str(raw.get("node_id") or ""), node_ip=str(raw.get("node_ip") or ""),
                   actor_name=str(raw.get("actor_name") or ""), pid=raw.get("pid"))


@dataclass(frozen=True)
class Deployment:
    name: str
    status: str = ""
    message: str = ""
    target_replicas: int | None = None  # what the controller (the autoscaler) wants now
    replicas: tuple[Replica, ...] = ()
    user_config: dict[str, Any] | None = None  # what the replicas' reconfigure() got (live batching)

    @property
    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]

    @property
    def running_ids(self) -> list[str]:
        return sorted(r.replica_id for r in self.running)

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any]) -> Deployment:
        return cls(name=name, status=str(raw.get("status") or ""), message=str(raw.get("message") or ""),
                   target_replicas=raw.get("target_num_replicas"),
                   replicas=tuple(Replica.parse(r) for r in raw.get("replicas") or []),
                   user_config=(raw.get("deployment_config") or {}).get("user_config"))


@dataclass(frozen=True)
class AppStatus:
    name: str
    status: str = ""  # DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, NOT_STARTED, or NOT_DEPLOYED
    message: str = ""
    route_prefix: str | None = None
    deployments: dict[str, Deployment] = field(default_factory=dict)
    # The application entry of the Serve config it was deployed with (what `config_of_application` reads).
    deployed_config: dict[str, Any] = field(default_factory=dict)

    def deployment(self, name: str) -> Deployment:
        """The named deployment, or an empty one (no replicas) while Serve has not created it yet."""
        return self.deployments.get(name) or Deployment(name)

    @property
    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas]

    @property
    def running_replicas(self) -> int:
        return sum(r.running for r in self.replicas)

    def serve_messages(self, limit: int = 3000) -> str:
        """Serve's own words: the app's message, then its deployments' (a replica's traceback ends with the
        cause, so a long text keeps its end)."""
        messages = [self.message] + [d.message for d in self.deployments.values()]
        text = "\n".join(m for m in messages if m) or "Serve gave no message"
        return text if len(text) <= limit else "…" + text[-limit:]

    def runs(self, application: dict[str, Any]) -> bool:
        """Serve runs this `applications:` entry: every key of it, and every key of each of its `deployments:`,
        equals what Serve echoes back in `deployed_config`. Keys Serve has beyond ours are not compared."""
        got = self.deployed_config
        if not all(_same(v, got.get(k)) for k, v in application.items() if k != "deployments"):
            return False
        echoed = {d.get("name"): d for d in got.get("deployments") or []}
        return all(
            d["name"] in echoed and all(_same(v, echoed[d["name"]].get(k)) for k, v in d.items())
            for d in application.get("deployments") or []
        )

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any]) -> AppStatus:
        return cls(name=name, status=str(raw.get("status") or ""), message=str(raw.get("message") or ""),
                   route_prefix=raw.get("route_prefix"),
                   deployments={d: Deployment.parse(d, v or {}) for d, v in (raw.get("deployments") or {}).items()},
                   deployed_config=dict(raw.get("deployed_app_config") or {}))


def _same(want: Any, got: Any) -> bool:
    """`got` is `want` as Serve echoes it back: through its schema 2 may come back as 2.0, and a key we
    set to None may be left out."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        keys = {k for k, v in want.items() if v is not None} | {k for k, v in got.items() if v is not None}
        return all(_same(want.get(k), got.get(k)) for k in keys)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(want) == len(got) and all(map(_same, want, got))
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and float(want) == float(got)
    return want == got


def parse_serve_details(details: dict[str, Any]) -> dict[str, AppStatus]:
    """Every application of a `GET /api/serve/applications/` answer, by name."""
    return {name: AppStatus.parse(name, raw or {}) for name, raw in (details.get("applications") or {}).items()}


def routing_of(application: dict[str, Any] | None) -> dict[str, Any]:
    """What of an `applications:` entry fixes how requests reach replicas: its deployments and their routers."""
    return {d.get("name"): d.get("request_router_config") for d in (application or {}).get("deployments") or []}
