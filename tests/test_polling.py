"""How a deploy's wait polls: short intervals growing to a cap, short again on each change, and
`AppHandle.wait_running` noticing RUNNING and the route well under the old fixed 1 s + 0.5 s polls."""
from __future__ import annotations

import time

import httpx
import pytest

from llmserve_nb.cluster.app import AppHandle
from llmserve_nb.cluster.polling import Poll
from llmserve_nb.cluster.status import AppStatus
from llmserve_nb.config import AppConfig
from llmserve_nb.backends import application


def test_poll_grows_to_its_cap_and_is_short_again_after_a_change():
    slept: list[float] = []
    poll = Poll(first_s=0.05, most_s=0.5, factor=2.0, sleep=slept.append)
    for _ in range(6):
        poll.seen("DEPLOYING")
        poll.wait()
    assert slept == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    poll.seen("RUNNING")
    poll.wait()
    poll.seen("RUNNING")
    poll.wait()
    assert slept[-2:] == pytest.approx([0.05, 0.1])
    poll.wait(at_most_s=0.01)  # what is left of a deadline bounds the wait
    poll.wait(at_most_s=-3.0)
    assert slept[-2:] == pytest.approx([0.01, 0.0])


def test_poll_refuses_intervals_that_never_wait_or_shrink():
    with pytest.raises(ValueError):
        Poll(first_s=0.0)
    with pytest.raises(ValueError):
        Poll(first_s=1.0, most_s=0.5)
    with pytest.raises(ValueError):
        Poll(factor=0.5)


class _TurnsRunning:
    """A cluster whose app is DEPLOYING until `running_at` (monotonic), then RUNNING with the wanted config."""

    serve_url = "http://serve"

    def __init__(self, running_at: float):
        self.running_at = running_at
        self.reads: list[float] = []

    def application(self, config: AppConfig) -> dict:
        return application(config)

    def app_status(self, name: str) -> AppStatus:
        now = time.monotonic()
        self.reads.append(now)
        status = "RUNNING" if now >= self.running_at else "DEPLOYING"
        return AppStatus(name, status=status, deployed_config=application(AppConfig(name=name)))


def test_wait_running_notices_running_and_the_route_within_a_fraction_of_a_second():
    """The transition comes 0.3 s after the wait starts; with fixed 1 s status polls the wait took >= 1 s."""
    cluster = _TurnsRunning(running_at=time.monotonic() + 0.3)
    health_calls = []

    def proxy(request: httpx.Request) -> httpx.Response:
        health_calls.append(time.monotonic())
        # The proxy learns the route a moment after the app is RUNNING: 404 first, then 200.
        return httpx.Response(404 if len(health_calls) == 1 else 200, json={"status": "ok"})

    handle = AppHandle(cluster, AppConfig(), transport=httpx.MockTransport(proxy))  # type: ignore[arg-type]
    t0 = time.monotonic()
    handle.wait_running(timeout_s=10, progress=None)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.8, elapsed
    assert len(health_calls) == 2 and health_calls[1] - health_calls[0] < 0.2
    # Polling fast did not mean polling without pause: a handful of reads, not hundreds.
    assert len(cluster.reads) <= 8, len(cluster.reads)
