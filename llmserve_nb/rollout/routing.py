"""The router's configuration and its choice of version: pure Python, no Ray, so it is unit-tested alone.

Sticky sessions use weighted rendezvous hashing (highest random weight): every version scores
`-weight / ln(h)`, with `h` a hash of (session, version) mapped into (0, 1), and the highest score
wins. A session then always goes to the same version while the weights are unchanged, each version
gets its weight's share of sessions, and a weight change moves only the sessions it has to: raising a
version's weight only moves sessions *to* it, lowering it only moves sessions *away* from it, and no
session moves between two versions whose weights did not change. Requests without a session header
are spread at random in proportion to the weights.
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROUTER_DEPLOYMENT = "RolloutRouter"
ROUTER_IMPORT_PATH = "llmserve_nb.rollout.router:build_router"
SERVED_BY_HEADER = "x-served-by"  # response header: the version (Serve application) that answered
EPOCH_HEADER = "x-rollout-epoch"  # response header: the weights' generation the choice was made with
STATUS_PATH = "/-/rollout"  # under the public route: the router's own status, never forwarded


class Version(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="The Serve application of this version.")
    route_prefix: str = Field(..., pattern=r"^/", description="Its own route prefix (the router forwards there).")
    weight: float = Field(0.0, ge=0.0, le=100.0, description="Share of traffic in percent.")


class RouterConfig(BaseModel):
    """The router deployment's `user_config`: everything it needs, so every change is applied in place
    (`reconfigure`) and the router's replicas are never restarted."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(0, ge=0, description="Bumped on every change of the weights; sent back in x-rollout-epoch.")
    versions: list[Version] = Field(default_factory=list)
    upstream: str = Field("http://127.0.0.1:8000", description="The Serve HTTP proxy the router forwards through.")
    sticky_header: str = Field("x-session-id", description="Request header naming the session.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest wait for the next byte from a version.")
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, le=10, description="Re-sends of a request no version received (connect failure, "
                         "no route yet); a request a version received is never re-sent.")

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"version names must be unique, got {names}")
        prefixes = [v.route_prefix for v in self.versions]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"version route prefixes must be unique, got {prefixes}")
        if self.versions and not any(v.weight > 0 for v in self.versions):
            raise ValueError("at least one version needs a weight above 0")
        return self

    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.versions}

    def version(self, name: str) -> Version:
        for v in self.versions:
            if v.name == name:
                return v
        raise KeyError(name)


def _unit_hash(session: str, version: str) -> float:
    """A uniform draw in (0, 1) fixed by (session, version)."""
    digest = hashlib.blake2b(f"{version}\x00{session}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def pick_version(weights: dict[str, float], session: str | None = None, *, exclude: Iterable[str] = (),
                 rng: random.Random | None = None) -> str:
    """The version that serves a request: sticky by `session` (weighted rendezvous hashing), else random
    in proportion to the weights. Versions in `exclude` (already tried) are skipped while another with a
    weight above 0 remains."""
    live = {k: w for k, w in weights.items() if w > 0}
    if not live:
        raise ValueError("no version has a weight above 0")
    rest = {k: w for k, w in live.items() if k not in set(exclude)}
    live = rest or live
    if session is None:
        names = sorted(live)
        return (rng or random).choices(names, weights=[live[n] for n in names])[0]
    return max(sorted(live), key=lambda n: -live[n] / math.log(_unit_hash(session, n)))
