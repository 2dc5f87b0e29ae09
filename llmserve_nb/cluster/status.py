"""Serve's application status, parsed once from the dashboard's REST answer
(`GET /api/serve/applications/`) into typed records, so no caller digs through the raw dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppStatus", "Deployment", "Replica", "parse_serve_details"]


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
                   replicas=tuple(Replica.parse(r) for r in raw.get("replicas") or []))


@dataclass(frozen=True)
class AppStatus:
    name: str
    status: str = ""  # DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, NOT_STARTED
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

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any]) -> AppStatus:
        return cls(name=name, status=str(raw.get("status") or ""), message=str(raw.get("message") or ""),
                   route_prefix=raw.get("route_prefix"),
                   deployments={d: Deployment.parse(d, v or {}) for d, v in (raw.get("deployments") or {}).items()},
                   deployed_config=dict(raw.get("deployed_app_config") or {}))


def parse_serve_details(details: dict[str, Any]) -> dict[str, AppStatus]:
    """Every application of a `GET /api/serve/applications/` answer, by name."""
    return {name: AppStatus.parse(name, raw or {}) for name, raw in (details.get("applications") or {}).items()}
