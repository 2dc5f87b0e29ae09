"""Ray Serve's fast path (`llmserve_nb.cluster.fastpath`): the environment a Ray cluster starts with."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from llmserve_nb.cluster import fastpath


def test_started_with_sets_the_environment_only_for_the_block(monkeypatch):
    monkeypatch.setenv("LLMSERVE_NB_TEST_SET", "before")
    monkeypatch.delenv("LLMSERVE_NB_TEST_UNSET", raising=False)
    with fastpath.started_with({"LLMSERVE_NB_TEST_SET": "during", "LLMSERVE_NB_TEST_UNSET": "during"}):
        assert os.environ["LLMSERVE_NB_TEST_SET"] == os.environ["LLMSERVE_NB_TEST_UNSET"] == "during"
    assert os.environ["LLMSERVE_NB_TEST_SET"] == "before"
    assert "LLMSERVE_NB_TEST_UNSET" not in os.environ


def test_started_with_restores_after_an_error(monkeypatch):
    monkeypatch.delenv("LLMSERVE_NB_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), fastpath.started_with({"LLMSERVE_NB_TEST_UNSET": "x"}):
        raise RuntimeError("ray.init failed")
    assert "LLMSERVE_NB_TEST_UNSET" not in os.environ


def test_every_variable_is_one_ray_reads():
    """A Ray upgrade that renamed a variable would turn a setting silently off: each name must be in Ray's
    Serve constants."""
    from ray.serve._private import constants

    source = inspect.getsource(constants)
    names = {**fastpath.HAPROXY_ENV, **fastpath.EMBEDDED_DRAIN_ENV, **fastpath.haproxy_instance_env(Path("/x"), 1, 2)}
    assert [n for n in names if f'"{n}"' not in source] == []


def test_haproxy_instance_env_keeps_clusters_apart(tmp_path):
    a = fastpath.haproxy_instance_env(tmp_path / "a", 1001, 1002)
    b = fastpath.haproxy_instance_env(tmp_path / "b", 2001, 2002)
    assert set(a.values()).isdisjoint(b.values())
    assert all(v.startswith(str(tmp_path / "a")) for k, v in a.items() if not k.endswith("_PORT"))


def test_embedded_env_is_nothing_unless_the_user_turned_on_throughput_mode(monkeypatch):
    for name in {**fastpath.HAPROXY_ENV, **fastpath.EMBEDDED_DRAIN_ENV}:
        monkeypatch.delenv(name, raising=False)
    assert fastpath.embedded_env() == {}
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    assert fastpath.embedded_env() == {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def test_embedded_env_leaves_a_drain_the_user_set(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    assert fastpath.embedded_env() == {}
