"""The Serve app end to end: a real embedded Ray, real HTTP, the official `openai` client."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.ray

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion(openai_client, app):
    r = openai_client.chat.completions.create(model=app.model, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_and_prompt_list(openai_client, app):
    r = openai_client.completions.create(model=app.model, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8
    many = openai_client.completions.create(model=app.model, prompt=["One", "Two", "Three"], temperature=0, max_tokens=4)
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_streaming_matches_non_streaming_and_reports_usage(openai_client, app):
    plain = openai_client.chat.completions.create(model=app.model, messages=QUESTION, temperature=0, max_tokens=32)
    chunks = list(openai_client.chat.completions.create(
        model=app.model, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_stream_ends_with_done(app):
    body = {"model": app.model, "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_generate_models_health(app):
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{app.base_url}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 8}, headers=h, timeout=120)
    assert r.status_code == 200 and r.json()["generated_text"]
    assert httpx.get(f"{app.base_url}/v1/models", headers=h).json()["data"][0]["id"] == app.model
    assert httpx.get(f"{app.base_url}/health").json() == {"status": "ok", "model": app.model}
    assert "/v1/chat/completions" in httpx.get(f"{app.base_url}/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/generate", {"prompt": "hi", "max_new_tokens": 999}, 400, "max_new_tokens: Input should be less than or equal to 256"),
        ("/generate", {"prompt": "", "max_new_tokens": 5}, 400, "prompt"),
        ("/generate", {"max_new_tokens": 5}, 400, "prompt: Field required"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": QUESTION, "n": 2}, 400, "n: Input should be less than or equal to 1"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 100000}, 400, "exceeds this server's limit"),
        ("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 10}, 400, "exceeds the context length"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "single prompt"),
        ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400, "prompt must not be empty"),
        ("/v1/completions", {"prompt": ["ok", ""], "max_tokens": 4}, 400, "prompt must not be empty"),
    ],
)
def test_bad_requests_get_clear_4xx(app, path, body, status, fragment):
    r = httpx.post(f"{app.base_url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_bad_json_is_400(app):
    r = httpx.post(f"{app.base_url}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_wrong_api_key_is_401(app):
    bad = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
        bad.chat.completions.create(model=app.model, messages=QUESTION, max_tokens=4)


def test_concurrent_requests_are_batched(app):
    burst = app.burst(n=12, max_tokens=16)
    assert burst["max_batch_size_seen"] > 1, burst
    assert sum(int(k) * v for k, v in burst["batch_size_histogram"].items()) == 12


def test_batched_answers_equal_sequential_answers(app):
    prompts = [f"Write one sentence about the number {i}." for i in range(6)]
    alone = [app.chat(p, max_tokens=20) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: app.chat(p, max_tokens=20), prompts))
    assert together == alone


def test_reconfigure_is_live_without_restarting_the_replica(cluster, app):
    before = app.stats()
    app.reconfigure(max_batch_size=4, batch_wait_timeout_s=0.05)
    after = app.stats()
    assert after["replica"] == before["replica"]
    assert after["batching"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}
    # Derived from the engine and the batch, and updated in place (Serve's own record of the deployment).
    assert _serve_option(cluster, app, "max_ongoing_requests") == 64 + 4
    burst = app.burst(n=8, max_tokens=8)
    assert burst["max_batch_size_seen"] <= 4
    app.reconfigure(max_batch_size=8, batch_wait_timeout_s=0.1)


def test_cluster_tables(cluster, app):
    import ray

    (node,) = cluster.nodes()
    assert (node["head"], node["state"], node["CPU"]) == (True, "ALIVE", ray.cluster_resources()["CPU"])
    row = next(r for r in cluster.applications() if r["app"] == app.name)
    assert row["app_status"] == "RUNNING" and row["running_replicas"] == 1
    assert app.name in app._repr_html_() or app.model in app._repr_html_()


def test_attach_to_a_running_app_by_name(cluster, app):
    attached = cluster.app(app.name)
    attached.api_key = API_KEY
    assert attached.config.build_args() == app.config.build_args()
    assert attached.config.batching == app.config.batching
    assert "Paris" in attached.chat("What is the capital of France?", max_tokens=24)
    with pytest.raises(Exception, match="no Serve application 'nope'"):
        cluster.app("nope")


def _h():
    return {"Authorization": f"Bearer {API_KEY}"}


def _serve_option(cluster, app, key):
    """A deployment option as Serve applies it (its REST details), not as the app's config asks for it."""
    return cluster.serve_details()["applications"][app.name]["deployments"]["LLMServer"]["deployment_config"].get(key)


def _wait(predicate, timeout=60.0, what="condition", every_s=0.2):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)  # the polling interval, not a guess at when the state changes
    raise AssertionError(f"timed out waiting for {what}")


def test_a_short_request_returns_when_done_not_when_its_long_peer_is(app):
    """Regression: an 8-token request sent together with a 200-token one took as long as the long one
    (one future per admission group), holding its max_ongoing_requests slot all that time. An admission
    batch of 2 with a long wait makes them one group: the long one waits for its peer."""
    import time

    def one(max_tokens):
        t0 = time.perf_counter()
        r = httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=300, json={
            "prompt": "Tell me about ships", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    app.reconfigure(max_batch_size=2, batch_wait_timeout_s=10.0)
    try:
        before = app.stats()
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(one, 200)
            _wait(lambda: app.stats()["requests_waiting"] == 1, what="the long request to wait for its admission batch",
                  every_s=0.05)
            short = pool.submit(one, 8)
            short_s, long_s = short.result(), long.result()
        groups = app.stats()["batch_size_histogram"]
    finally:
        app.reconfigure(max_batch_size=8, batch_wait_timeout_s=0.1)
    assert groups.get("2", 0) == before["batch_size_histogram"].get("2", 0) + 1  # they were admitted together
    assert short_s < 0.4 * long_s, (short_s, long_s)


def test_empty_prompt_fails_alone_and_requests_in_flight_are_unharmed(app):
    """Regression: `{"prompt": ""}` reached the engine as an empty sequence; its prefill raised and the
    batcher failed the four unrelated requests already decoding."""

    def decode(i):
        return httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=300, json={
            "prompt": f"Count to ten, take {i}", "max_tokens": 96, "ignore_eos": True, "temperature": 0})

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(decode, i) for i in range(4)]
        _wait(lambda: app.stats()["num_requests_running"] == 4, what="the four requests to decode", every_s=0.05)
        bad = httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=60, json={"prompt": ""})
        results = [f.result() for f in running]
    assert bad.status_code == 400 and "prompt must not be empty" in bad.json()["error"]["message"]
    assert [r.status_code for r in results] == [200] * 4
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [96] * 4


def test_a_dropped_stream_is_aborted_and_stops_costing_compute(app):
    """Regression: a client that closed its stream kept its row decoding to max_tokens."""
    before = app.stats()
    body = {"model": app.model, "prompt": "Write a very long story", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body, headers=_h(), timeout=120) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines >= 3:
                break  # the client goes away mid-stream
    after = _wait(lambda: (s := app.stats())["aborted"] > before["aborted"] and s["num_requests_running"] == 0 and s,
                  what="the dropped stream to be aborted")
    assert after["aborted"] == before["aborted"] + 1 and after["num_requests_waiting"] == 0  # nothing decodes for nobody
    assert after["decode_steps"] - before["decode_steps"] < 200  # far fewer than the 400 tokens asked for


def test_a_client_that_gives_up_on_a_plain_request_aborts_it(app):
    before = app.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=httpx.Timeout(1.5, connect=5), json={
            "prompt": "Write a very long story", "max_tokens": 400, "ignore_eos": True, "temperature": 0})
    after = _wait(lambda: (s := app.stats())["aborted"] > before["aborted"] and s["num_requests_running"] == 0 and s,
                  what="the abandoned request to be aborted")
    assert after["aborted"] == before["aborted"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 200


def test_a_client_that_leaves_while_its_request_waits_for_admission_costs_no_decoding(app):
    """A client that disconnects while its request waits in the admission batch: the request must never
    decode, whether Serve drops it from the batch or still submits it (then its abort came before its
    submit, and the engine honours it there). A second request, sent after the client left and so
    admitted no earlier than the first, tells when the first one's batch has gone."""
    app.reconfigure(max_batch_size=8, batch_wait_timeout_s=5.0)  # the client leaves after 1 s of it
    try:
        before = app.stats()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=httpx.Timeout(1.0, connect=5), json={
                "prompt": "Write a very long story", "max_tokens": 400, "ignore_eos": True, "temperature": 0})
        # The replica saw the client go: its request is no longer waiting (the record ended as an abort).
        _wait(lambda: app.stats()["requests_waiting"] == 0, what="the replica to drop the waiting request",
              every_s=0.05)
        probe = httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=120, json={
            "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0})
        assert probe.status_code == 200, probe.text
        after = _wait(lambda: (s := app.stats())["num_requests_running"] == 0 and s, what="the engine to go idle")
    finally:
        app.reconfigure(max_batch_size=8, batch_wait_timeout_s=0.1)
    assert after["generated_tokens"] - before["generated_tokens"] == 8  # the probe's, none for nobody
    assert after["decode_steps"] - before["decode_steps"] <= 8


def test_deployment_options_change_in_place_without_restart_or_reload(cluster, app):
    """Regression: autoscaling bounds and max_ongoing_requests travelled in the app's args, so changing them
    replaced the replica and reloaded the model. Now Serve updates them in place."""
    def replicas():
        deps = cluster.serve_details()["applications"][app.name]["deployments"]
        return {r["replica_id"] for r in deps["LLMServer"]["replicas"] if r["state"] == "RUNNING"}

    def serve_option(key):
        return _serve_option(cluster, app, key)

    ids, stats = replicas(), app.stats()
    original = app.config
    changed = original.with_overrides(**{
        # Autoscaling switched on with new bounds (no load, so it stays at one replica).
        "deployment.autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64},
        "deployment.max_ongoing_requests": 40,
    })
    try:
        app.update(changed, timeout_s=300)
        _wait(lambda: serve_option("max_ongoing_requests") == 40
              and serve_option("autoscaling_config")["max_replicas"] == 2, what="Serve to apply the new options")
        assert replicas() == ids
        assert app.stats()["replica"] == stats["replica"]
        assert app.stats()["engine"] == stats["engine"]  # same load, same timings: no reload
    finally:
        app.update(original, timeout_s=300)
        _wait(lambda: serve_option("max_ongoing_requests") == original.max_ongoing_requests,
              what="the original options back")
    assert replicas() == ids


def test_openapi_documents_the_statuses_the_app_returns(app):
    doc = httpx.get(f"{app.base_url}/openapi.json", timeout=30).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"200", "400", "401", "404", "500", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]


def test_replica_torch_threads_follow_its_cpu_allotment(app):
    """Regression: the engine took every core of the node while Serve gave the replica num_cpus=1, so two
    replicas on two cores fought over them."""
    assert app.stats()["engine"]["torch_threads"] == int(app.config.deployment.num_cpus)


def test_request_timeout_ends_a_request_with_504_and_aborts_its_row(cluster, app):
    original = app.config
    app.update(original.with_overrides(**{"deployment.request_timeout_s": 1.0}), timeout_s=300)
    try:
        before = app.stats()
        r = httpx.post(f"{app.base_url}/v1/completions", headers=_h(), timeout=120, json={
            "prompt": "Write a very long story", "max_tokens": 400, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 504 and "timed out after 1 s" in r.json()["error"]["message"]
        _wait(lambda: app.stats()["aborted"] > before["aborted"], what="the timed-out row to be aborted")
        body = {"prompt": "Write a very long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body, headers=_h(), timeout=120) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "timed out" in lines[-2]  # in-band: the headers were sent
        assert app.stats()["replica"] == before["replica"]  # user_config: applied in place
    finally:
        app.update(original, timeout_s=300)
