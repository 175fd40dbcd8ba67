"""``cai serve`` over real HTTP on 127.0.0.1: values, coalescing, bad input, faults, shutdown.

Fake judge engines (``test_judge.ScriptedEngine``, P(first slot) from the two responses' lengths, so
every pair has its own value) run the tests where the engine's numbers do not matter: exact
equality with the in-process reward, the engine calls, errors, a client killed mid-request,
overload, SIGTERM. One server with the real default model (module fixture) checks that served
values equal in-process ones. Every server here is started and stopped by the test that uses it;
every request has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fakes import ScriptedEngine, options_of
from servers import free_port
from test_rewards import FakeRewardModel

from cai import cli
from cai.judge import Judge
from cai.judge.pair import Preference
from cai.rewards.functions import JudgeReward, RewardModelReward
from cai.rewards.hooks import openrlhf_reward_func, verl_compute_score
from cai.rewards.remote import RemoteReward, RemoteRewardError
from cai.serve.app import create_app
from cai.serve.protocol import ServeOptions
from cai.serve.service import Service

TIMEOUT = 30.0
PROMPT = "How do I boil an egg?"


def by_length(conversation, prefix):
    """P(first slot) = len(A) / (len(A) + len(B)): a distinct value for every pair."""
    o = options_of(conversation)
    return (len(o["A"]), len(o["B"]))


class GatedEngine(ScriptedEngine):
    """A fake engine whose score calls wait for ``gate`` (set: no wait), take ``delay`` seconds,
    and raise on a conversation containing ``fail``."""

    def __init__(self, *, delay: float = 0.0, fail: str | None = None):
        super().__init__(by_length)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.delay, self.fail = delay, fail

    def score(self, conversations, options, *, prefixes=None, progress=False):
        self.started.set()
        assert self.gate.wait(TIMEOUT)
        time.sleep(self.delay)
        if self.fail is not None and any(self.fail in json.dumps(c) for c in conversations):
            raise RuntimeError(f"engine fell over on {self.fail!r}")
        return super().score(conversations, options, prefixes=prefixes, progress=progress)


@contextlib.contextmanager
def running(service: Service) -> Iterator[str]:
    """``service`` served on a free 127.0.0.1 port in a thread; yields its URL."""
    config = uvicorn.Config(
        create_app(service), host="127.0.0.1", port=free_port(), log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of ``GET /metrics`` (0 when absent)."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in httpx.get(f"{url}/metrics", timeout=TIMEOUT).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, str | bytes):
        kwargs["content"] = body
        kwargs.setdefault("headers", {})["content-type"] = "application/json"
    else:
        kwargs["json"] = body
    return httpx.post(url + path, timeout=TIMEOUT, **kwargs)


def completions(n: int) -> list[list[str]]:
    """n groups of two distinct completions."""
    return [[f"Boil it for {i} minutes.", "Put it in water" + "!" * (i % 7 + 1)] for i in range(n)]


# ---- coalescing, and values equal to in-process --------------------------------------------------


@functools.cache
def local_reward() -> JudgeReward:
    return JudgeReward(Judge(ScriptedEngine(by_length)), against="group", num_generations=2)


def local_group(group: list[str]) -> list[float | None]:
    """The in-process reward of one group of two (the fake engine's values)."""
    return local_reward()([PROMPT] * 2, group)


def test_64_concurrent_requests_each_get_their_own_values_in_fewer_engine_calls():
    # 8 threads, each with 8 requests in flight at once (the async client): all 64 are queued
    # while the engine holds the first batch, then go to it 16 at a time.
    engine = GatedEngine(delay=0.02)
    groups = completions(64)
    with running(Service(Judge(engine), options=ServeOptions(max_batch=16))) as url:
        reward = RemoteReward(url, against="group", num_generations=2).as_async()

        async def eight(k: int) -> list:
            return await asyncio.gather(
                *(reward([PROMPT] * 2, g) for g in groups[8 * k : 8 * k + 8])
            )

        engine.gate.clear()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(asyncio.run, eight(k)) for k in range(8)]
            deadline = time.monotonic() + TIMEOUT
            while metric(url, "cai_in_flight") < 65:  # the 64, and this metrics request
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert engine.started.is_set()  # the engine is busy: the server kept accepting
            engine.gate.set()
            got = [rewards for f in futures for rewards in f.result(TIMEOUT)]
        assert got == [local_group(g) for g in groups]  # exact: each its own, none mixed up
        calls = len(engine.score_calls)
        assert calls == metric(url, "cai_engine_calls_total", kind="judge")
        assert calls <= 1 + math.ceil(63 / 16)
        assert metric(url, "cai_batch_items_total", kind="judge") == 64
        assert metric(url, "cai_requests_total", endpoint="/v1/reward", status="200") == 64


def test_sync_async_and_verl_clients_give_the_in_process_values():
    judge = Judge(ScriptedEngine(by_length))
    prompts = [PROMPT, [{"role": "user", "content": PROMPT}]]
    group = completions(1)[0]
    refs = ["Eggs.", "Boil water first."]
    with running(Service(Judge(GatedEngine()))) as url:
        for against, kwargs in (("group", {"num_generations": 2}), ("reference", {})):
            local = JudgeReward(judge, against=against, centered=True, **kwargs)
            remote = RemoteReward(url, against=against, centered=True, **kwargs)
            columns = {"reference": refs} if against == "reference" else {}
            want = local(prompts, group, **columns)
            assert remote(prompts, group, **columns, trainer_state=object()) == want
            async_reward = remote.as_async()
            assert asyncio.iscoroutinefunction(async_reward)  # what TRL checks
            assert async_reward.__name__ == remote.__name__ == f"remote_{against}"
            assert asyncio.run(async_reward(prompts, group, **columns)) == want
        infos = [{"prompt": PROMPT}] * 2
        served = verl_compute_score(RemoteReward(url, against="reference"))
        local = verl_compute_score(JudgeReward(judge, against="reference"))
        assert served(["hh"] * 2, group, refs, infos) == local(["hh"] * 2, group, refs, infos)


def test_a_reward_model_alone_and_beside_the_judge():
    rm = FakeRewardModel({"Boil it.": 2.0, "No.": 0.0, "Eggs.": 1.0})
    local_rm = FakeRewardModel(rm.scores)
    with running(Service(reward_model=rm, reward_model_name="rm")) as url:
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["against"] == "score"
        for against, kwargs in ((None, {}), ("group", {"num_generations": 2}), ("reference", {})):
            local = RewardModelReward(local_rm, against=against, **kwargs)
            columns = {"reference": ["Eggs."] * 2} if against == "reference" else {}
            remote = RemoteReward(url, against=against, **kwargs)
            assert remote([PROMPT] * 2, ["Boil it.", "No."], **columns) == local(
                [PROMPT] * 2, ["Boil it.", "No."], **columns
            )
        out = post(url, "/get_reward", {"query": [PROMPT + "Boil it."], "prompts": [PROMPT]})
        assert out.json()["rewards"] == [2.0]  # the raw score
        refused = post(
            url, "/v1/judge", {"pairs": [{"prompt": PROMPT, "response_a": "a", "response_b": "b"}]}
        )
        assert refused.status_code == 422 and "no judge" in refused.json()["error"]
    with running(Service(Judge(GatedEngine()), rm)) as url:
        body = {"prompts": [PROMPT] * 2, "completions": ["Boil it.", "No."], "against": "group"}
        body["num_generations"] = 2
        by_judge = post(url, "/v1/reward", body).json()["rewards"]
        by_model = post(url, "/v1/reward", {**body, "scorer": "reward_model"}).json()["rewards"]
        assert by_judge == local_group(["Boil it.", "No."])
        assert by_model == RewardModelReward(local_rm, against="group", num_generations=2)(
            [PROMPT] * 2, ["Boil it.", "No."]
        )
        assert metric(url, "cai_engine_calls_total", kind="reward_model") == 1


# ---- bad input, faults ---------------------------------------------------------------------------

MALFORMED = [
    ("/v1/reward", "{not json", 400, "malformed JSON"),
    ("/v1/reward", "[1, 2]", 422, "the body must be a JSON object, got list"),
    ("/v1/reward", {"prompts": [PROMPT]}, 422, "completions: Field required"),
    ("/v1/reward", {"prompts": [3], "completions": ["a"]}, 422, "prompts[0]: expected a string"),
    (
        "/v1/reward",
        {"prompts": [PROMPT], "completions": ["a"], "num_generations": "2"},
        422,
        "num_generations: Input should be a valid integer",
    ),
    (
        "/v1/reward",
        {"prompts": [PROMPT], "completions": ["a", "b"]},
        422,
        "completions: 2 items, but prompts has 1",
    ),
    (
        "/v1/reward",
        {"prompts": [PROMPT], "completions": ["a"], "refs": ["b"]},
        422,
        "refs: Extra inputs are not permitted",
    ),
    (
        "/v1/reward",
        {"prompts": [PROMPT] * 2, "completions": ["a", "b"], "against": "group"},
        422,
        "against='group' needs num_generations",
    ),
    (
        "/v1/reward",
        {"prompts": [PROMPT] * 5, "completions": ["a"] * 5},
        413,
        "completions: 5 items",
    ),
    ("/v1/judge", {"pairs": [{"prompt": PROMPT, "response_a": "a"}]}, 422, "pairs[0].response_b"),
    (
        "/v1/judge",
        {"pairs": [{"prompt": PROMPT, "response_a": " ", "response_b": "b"}]},
        422,
        "pair 0: response_a is empty",
    ),
    (
        "/get_reward",
        {"query": [PROMPT + "a"], "prompts": [PROMPT, PROMPT], "labels": ["b"]},
        422,
        "prompts: 2 items, but query has 1",
    ),
    (
        "/get_reward",
        {"query": [PROMPT + "a"], "prompts": [PROMPT], "labels": [""]},
        422,
        "labels[0]: the reference response",
    ),
    (
        "/get_reward",
        {"query": ["a" + PROMPT], "prompts": [PROMPT], "labels": ["b"]},
        422,
        "query 0 does not start with its prompt",
    ),
    ("/v1/reward", "x" * 5000, 413, "the body is over 4096 bytes"),
]


def test_malformed_requests_get_their_status_and_field_and_the_server_goes_on():
    options = ServeOptions(max_items=4, max_body_bytes=4096)
    good = {"prompts": [PROMPT] * 2, "completions": ["Boil it.", "No."], "against": "reference"}
    good["references"] = ["Eggs."] * 2
    with running(Service(Judge(GatedEngine()), options=options)) as url:
        for path, body, status, message in MALFORMED:
            response = post(url, path, body)
            assert (response.status_code, message) == (status, message)
            assert message in response.json()["error"], (path, body)
            assert post(url, "/v1/reward", good).status_code == 200, (path, body)
        r = post(url, "/v1/reward", {"prompts": [PROMPT] * 2, "completions": ["a", "b"], "refs": 1})
        assert r.json()["field"] == "refs"


def test_api_key():
    with running(Service(Judge(GatedEngine()), options=ServeOptions(api_key="s3cret"))) as url:
        body = {"prompts": [PROMPT], "completions": ["Boil it."], "references": ["Eggs."]}
        body["against"] = "reference"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = post(url, "/v1/reward", body, headers=headers)
            assert response.status_code == 401
            assert "Authorization: Bearer KEY" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 401
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
        ok = post(url, "/v1/reward", body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        remote = RemoteReward(url, against="reference", api_key="s3cret")
        assert remote([PROMPT], ["Boil it."], reference=["Eggs."]) == ok.json()["rewards"]
        with pytest.raises(RemoteRewardError, match=re.escape(f"{url}/v1/reward: HTTP 401")):
            RemoteReward(url, against="reference")([PROMPT], ["Boil it."], reference=["Eggs."])


def test_an_engine_error_fails_its_batch_with_the_reason_not_the_server():
    engine = GatedEngine(fail="BOOM")
    with running(Service(Judge(engine))) as url:
        bad = post(
            url,
            "/v1/judge",
            {"pairs": [{"prompt": PROMPT, "response_a": "BOOM", "response_b": "b"}]},
        )
        assert bad.status_code == 500
        assert "RuntimeError: engine fell over on 'BOOM'" in bad.json()["error"]
        good = post(
            url, "/v1/judge", {"pairs": [{"prompt": PROMPT, "response_a": "a", "response_b": "bb"}]}
        )
        assert good.status_code == 200
        [pref] = good.json()["preferences"]
        assert pref["p_a"] == pytest.approx(1 / 3) and pref["winner"] == "B"
        assert metric(url, "cai_engine_errors_total", kind="judge") == 1


def test_a_client_killed_mid_request_costs_the_others_nothing():
    engine = GatedEngine()
    with running(Service(Judge(engine))) as url:
        remote = RemoteReward(url, against="group", num_generations=2)
        engine.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(remote, [PROMPT] * 2, ["Boil it.", "No."])
            assert engine.started.wait(TIMEOUT)  # the engine is busy with the first request
            # The second client sends its request, then dies while it waits in the queue.
            body = json.dumps(
                {
                    "prompts": [PROMPT] * 2,
                    "completions": ["GONE", "x"],
                    "against": "group",
                    "num_generations": 2,
                }
            ).encode()
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
                s.sendall(
                    b"POST /v1/reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                deadline = time.monotonic() + TIMEOUT
                while metric(url, "cai_queue_length") < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            deadline = time.monotonic() + TIMEOUT
            while metric(url, "cai_client_disconnects_total") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            third = pool.submit(remote, [PROMPT] * 2, ["Boil it well.", "No."])
            engine.gate.set()
            # P(first slot) = 8 / (8 + 3) in both orders: p_a = 8/11.
            assert first.result(TIMEOUT) == pytest.approx([8 / 11, 3 / 11])
            assert third.result(TIMEOUT) == local_group(["Boil it well.", "No."])
        # The dead client's pair never reached the engine.
        assert not any("GONE" in json.dumps(c) for c, _ in engine.score_calls)
        assert metric(url, "cai_queue_length") == 0


def test_a_full_queue_answers_503_and_remote_reward_retries():
    engine = GatedEngine()
    with running(Service(Judge(engine), options=ServeOptions(max_queue=1))) as url:
        remote = RemoteReward(url, against="group", num_generations=2, backoff=0.05, retries=50)
        engine.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(remote, [PROMPT] * 2, ["Boil it.", "No."])
            assert engine.started.wait(TIMEOUT)
            queued = pool.submit(remote, [PROMPT] * 2, ["Boil it well.", "No."])
            deadline = time.monotonic() + TIMEOUT
            while metric(url, "cai_queue_length") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full = post(
                url,
                "/v1/reward",
                {
                    "prompts": [PROMPT] * 2,
                    "completions": ["a", "b"],
                    "against": "group",
                    "num_generations": 2,
                },
            )
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "overloaded" in full.json()["error"]
            retried = pool.submit(remote, [PROMPT] * 2, ["Boil.", "No!"])
            while metric(url, "cai_requests_total", endpoint="/v1/reward", status="503") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            engine.gate.set()
            assert [f.result(TIMEOUT) for f in (first, queued, retried)] == [
                local_group(["Boil it.", "No."]),
                local_group(["Boil it well.", "No."]),
                local_group(["Boil.", "No!"]),
            ]


def test_remote_reward_errors_name_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    remote = RemoteReward(url, against="group", num_generations=2, retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=re.escape(f"{url}/v1/reward: no answer after 3")):
        remote([PROMPT] * 2, ["a", "b"])
    with pytest.raises(RemoteRewardError, match="no answer after 3 tries"):
        asyncio.run(remote.as_async()([PROMPT] * 2, ["a", "b"]))
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        remote([PROMPT] * 2, ["a"])
    with pytest.raises(ValueError, match="column 'reference'"):
        RemoteReward(url, against="reference")([PROMPT], ["a"], answer=["b"])
    with (
        running(Service(Judge(GatedEngine()))) as served,
        pytest.raises(RemoteRewardError, match=r"HTTP 422: completion 1: expected a string"),
    ):
        RemoteReward(served, against="group", num_generations=2)(
            [PROMPT] * 2, ["a", [{"role": "user", "content": "b"}]]
        )


SLOW_SERVER = """
import re, sys, time
from cai.engine import OptionScores
from cai.judge import Judge, Preference
from cai.serve import ServeOptions, Service, serve
sys.path.insert(0, {tests!r})
from fakes import ScriptedEngine, options_of
from test_rewards import FakeRewardModel

def by_length(conversation, prefix):
    o = options_of(conversation)
    return (len(o["A"]), len(o["B"]))

class Slow(ScriptedEngine):
    def score(self, *args, **kwargs):
        time.sleep(0.5)
        return super().score(*args, **kwargs)

serve(Service(Judge(Slow(by_length)), options=ServeOptions(max_batch=1)), "127.0.0.1", {port})
print("drained", flush=True)
"""


@pytest.mark.timeout(120)
def test_sigterm_answers_the_requests_in_flight_then_exits_0(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = SLOW_SERVER.format(tests=str(Path(__file__).parent), port=port)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None, "no server"
            time.sleep(0.1)
        remote = RemoteReward(url, against="group", num_generations=2)
        groups = completions(4)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(remote, [PROMPT] * 2, g) for g in groups]
            deadline = time.monotonic() + 60
            while metric(url, "cai_in_flight") < 5:  # the four, and this metrics request
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            got = [f.result(60) for f in futures]
        assert got == [local_group(g) for g in groups]
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out.decode()
        assert out.decode().strip().endswith("drained")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.timeout(120)
def test_cai_serve_command_serves_then_stops_on_sigterm(tiny_model):
    # The command as users run it, on a random 2-layer model with a 256-token context.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cai.cli", "serve", "--model", tiny_model, "--port", str(port)]
    command += ["--mode", "pairwise"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CAI_API_KEY": "k"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                health = httpx.get(f"{url}/health", timeout=TIMEOUT)
                break
            assert time.monotonic() < deadline and process.poll() is None, "no server"
            time.sleep(0.1)
        assert health.json()["against"] == "reference" and health.json()["mode"] == "pairwise"
        pair = {"prompt": PROMPT, "response_a": "a", "response_b": "b"}
        judged = post(url, "/v1/judge", {"pairs": [pair]}, headers={"Authorization": "Bearer k"})
        # The few-shot judge prompt does not fit this model's context: the engine's own check,
        # the pair's own error (as Judge.label gives for a failed pair).
        assert judged.status_code == 200
        [pref] = judged.json()["preferences"]
        assert pref["p_a"] is None and "context" in pref["error"]
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out.decode()
        assert f"cai serve: {url} (judge " in out.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_metrics_are_prometheus_text():
    with running(Service(Judge(GatedEngine()))) as url:
        RemoteReward(url, against="group", num_generations=2)([PROMPT] * 2, ["a", "bb"])
        post(url, "/v1/reward", "{")
        text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            name = sample.split("{")[0]
            assert name.removesuffix("_sum").removesuffix("_count") in types, line
            assert math.isnan(float(value)) or float(value) >= 0
    assert types["cai_requests_total"] == "counter" and types["cai_batch_size"] == "summary"
    assert types["cai_request_seconds"] == "summary" and types["cai_queue_length"] == "gauge"
    assert 'cai_requests_total{endpoint="/v1/reward",status="400"} 1' in text
    assert 'cai_request_seconds{endpoint="/v1/reward",quantile="0.99"}' in text
    assert 'cai_batch_size{quantile="0.5"} 1' in text


def test_cli_serve_refuses_bad_flags_before_loading_a_model(capsys):
    for flags, message in (
        (["--against", "group"], "--against group needs --num-generations"),
        (["--against", "score", "--mode", "pairwise"], "--against score is a completion's own"),
        (["--num-generations", "4"], "--num-generations applies only to --against group"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ):
        assert cli.main(["serve", "--model", "/nonexistent/model", *flags]) == 1
        assert message in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.mode) == ("127.0.0.1", 8000, "pointwise")


# ---- the real default model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(hf_engine) -> Iterator[tuple[str, Judge]]:
    """One server with the real judge (the session's float32 engine; a wait long enough that
    concurrent requests share an engine call) and an in-process judge on the same engine."""
    with running(Service(Judge(hf_engine), options=ServeOptions(max_wait_ms=1000))) as url:
        yield url, Judge(hf_engine)


QUESTIONS = ["How do I boil an egg?"]
ANSWERS = ["Boil it for nine minutes, then cool it in cold water."]
RUDE = ["Figure it out yourself, idiot."]

# HF float32 option log-probs move ~1e-5 with the batch a request shares (padding).
CLOSE = 1e-4


@pytest.mark.slow
def test_real_concurrent_requests_give_the_in_process_values(real):
    # OpenRLHF's payload, TRL's client (a group of two) and /v1/judge, sent at once, all over
    # the same pair (answer vs rude answer): one in-process call gives every expected value.
    url, judge = real
    queries = [q + a for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    local = openrlhf_reward_func(JudgeReward(judge, against="reference"))(queries, QUESTIONS, RUDE)
    want = local["rewards"].tolist()
    pairs = [
        {"prompt": q, "response_a": a, "response_b": r}
        for q, a, r in zip(QUESTIONS, ANSWERS, RUDE, strict=True)
    ]
    remote = RemoteReward(url, against="group", num_generations=2)
    with ThreadPoolExecutor(3) as pool:
        openrlhf = pool.submit(
            post, url, "/get_reward", {"query": queries, "prompts": QUESTIONS, "labels": RUDE}
        )
        trl = pool.submit(remote, QUESTIONS * 2, [ANSWERS[0], RUDE[0]])
        judged = pool.submit(post, url, "/v1/judge", {"pairs": pairs})
        out, group, prefs = openrlhf.result(), trl.result(), judged.result()
    assert out.status_code == 200
    assert out.json()["rewards"] == pytest.approx(want, abs=CLOSE)
    assert out.json()["scores"] == out.json()["rewards"] and out.json()["extra_logs"] == {}
    assert group == pytest.approx([want[0], 1 - want[0]], abs=CLOSE)
    prefs = prefs.json()["preferences"]
    assert [p["p_a"] for p in prefs] == pytest.approx(want, abs=CLOSE)
    for pref in prefs:  # Judge.label's fields (a pairwise record has no pointwise scores)
        assert pref.keys() == Preference.__dataclass_fields__.keys() - {"scores"}
        assert pref["model"] == judge.engine.model_name and pref["error"] is None
        assert pref["winner"] == ("A" if pref["p_a"] > 0.5 else "B")
