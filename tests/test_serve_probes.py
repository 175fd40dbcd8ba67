"""``cai serve`` against a hostile probe: requests that can never fit, a malformed request among
good ones, a pointwise judge as a per-response score, server hygiene (deep JSON, clients that
leave or stall mid-body, a port in use), over-long pairs, and engine failures told from bugs.

Fake engines (``tests/fakes.py``) everywhere but the one check of the real pointwise judge.
Servers bind 127.0.0.1; every request and subprocess has a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fakes import PairEngine, ScriptedEngine
from test_serve import (
    PROMPT,
    TIMEOUT,
    GatedEngine,
    by_length,
    metric,
    post,
    running,
)

from cai import cli
from cai.cli.serve import _default_judge
from cai.engine import PromptTooLong
from cai.judge import Judge
from cai.rewards.functions import JudgeReward
from cai.rewards.hooks import openrlhf_reward_func
from cai.serve.protocol import ServeOptions, check_options
from cai.serve.service import Service

ROOT = Path(__file__).parent.parent


def group_body(g: int, **extra) -> dict:
    """One group of ``g`` distinct completions of PROMPT (``g(g-1)/2`` judge pairs)."""
    completions = [f"Boil it{'!' * i}" for i in range(g)]
    return {
        "prompts": [PROMPT] * g,
        "completions": completions,
        "against": "group",
        "num_generations": g,
        **extra,
    }


def judge_body(a: str, b: str, prompt=PROMPT) -> dict:
    return {"pairs": [{"prompt": prompt, "response_a": a, "response_b": b}]}


def raw_request(url: str, body: bytes, length: int) -> socket.socket:
    """A socket that sent a /v1/reward request declaring ``length`` body bytes, then ``body``."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    s.sendall(
        b"POST /v1/reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + body
    )
    return s


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ---- 1. a request's size in engine items (pairs), not only in completions -------------------------


def test_a_group_over_the_queue_size_is_413_naming_the_limit_not_a_retryable_503():
    engine = GatedEngine()
    with running(Service(Judge(engine), options=ServeOptions(max_queue=10))) as url:
        refused = post(url, "/v1/reward", group_body(6))  # 15 pairs, on an idle server
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert "15 judge pairs" in error and "--max-queue" in error and "10" in error
        assert "retry-after" not in refused.headers
        assert not engine.score_calls
        assert post(url, "/v1/reward", group_body(5)).status_code == 200  # 10 pairs fit


def test_a_quadratic_group_at_the_defaults_is_413_before_any_engine_call():
    engine = GatedEngine()
    with running(Service(Judge(engine))) as url:
        refused = post(url, "/v1/reward", group_body(362))  # 362 completions: under --max-items
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert "65341 judge pairs" in error and "--max-pairs" in error and "G(G-1)/2" in error
        assert not engine.score_calls


def test_the_limits_say_what_they_count():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    assert "completions" in helps["max_items"]
    assert "judge pairs" in helps["max_pairs"] and "G(G-1)/2" in helps["max_pairs"]
    assert "judge pairs" in helps["max_queue"] and "413" in helps["max_queue"]
    assert "judge pairs" in helps["max_batch"]
    source = (ROOT / "cai/serve/protocol.py").read_text()
    assert "Completions (or /v1/judge pairs" in source and "G(G-1)/2 judge pairs" in source


# ---- 2. a malformed request fails alone; the others still share a batch ---------------------------


def test_a_pair_the_judge_refuses_fails_alone_and_the_good_ones_share_one_batch():
    engine = GatedEngine()
    not_user_last = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Hi"}]
    with running(Service(Judge(engine))) as url:
        engine.gate.clear()
        with ThreadPoolExecutor(18) as pool:
            first = pool.submit(post, url, "/v1/judge", judge_body("a", "bb"))
            assert engine.started.wait(TIMEOUT)  # the engine holds the first request
            goods = [
                pool.submit(post, url, "/v1/judge", judge_body("a" * (i + 1), "b"))
                for i in range(16)
            ]
            bad = pool.submit(post, url, "/v1/judge", judge_body("a", "b", not_user_last))
            wait_for(
                lambda: metric(url, "cai_queue_length") + bad.done() >= 17,
                "the 16 good requests were not queued",
            )
            engine.gate.set()
            answers = [f.result(TIMEOUT) for f in [first, *goods]]
        assert [a.status_code for a in answers] == [200] * 17
        refused = bad.result(TIMEOUT)
        assert refused.status_code == 422
        assert "pair 0: the prompt must end with a non-empty user message" in refused.text
        assert refused.json()["field"] == "pairs"
        # The first request, then the 16 good ones together: the bad one never joined them.
        assert len(engine.score_calls) == 2
        reward = post(url, "/v1/reward", {**group_body(2), "prompts": [not_user_last] * 2})
        assert reward.status_code == 422 and reward.json()["field"] == "prompts"
        assert "prompts[0]: the prompt must end with a non-empty user message" in reward.text
        assert len(engine.score_calls) == 2


# ---- 3. a pointwise judge served as each completion's own score ---------------------------------


def test_a_pointwise_judge_serves_each_completions_own_score():
    local = Judge(PairEngine(), mode="pointwise")
    completions = ["Boil it.", "Boil it for nine minutes, then cool it.", " "]
    prompts = [PROMPT] * 3
    want = JudgeReward(local, mode="pointwise")(prompts, completions)
    with running(Service(Judge(PairEngine(), mode="pointwise"))) as url:
        health = post_get(url, "/health")
        assert (health["mode"], health["against"]) == ("pointwise", "score")
        body = {"prompts": prompts, "completions": completions}
        assert post(url, "/v1/reward", body).json()["rewards"] == want
        assert post(url, "/v1/reward", {**body, "against": "score"}).json()["rewards"] == want
        centered = JudgeReward(local, mode="pointwise", centered=True)(prompts, completions)
        served = post(url, "/v1/reward", {**body, "centered": True}).json()["rewards"]
        assert served == centered
        queries = [PROMPT + c for c in completions]
        out = post(url, "/get_reward", {"query": queries, "prompts": prompts})  # no labels
        assert out.status_code == 200, out.text
        assert out.json()["rewards"] == want
        group = JudgeReward(local, against="group", num_generations=3)(prompts, completions)
        served = post(url, "/v1/reward", {**body, "against": "group", "num_generations": 3})
        assert served.json()["rewards"] == group


def post_get(url: str, path: str) -> dict:
    import httpx

    return httpx.get(url + path, timeout=TIMEOUT).json()


def test_a_pairwise_judge_refuses_against_score():
    with running(Service(Judge(GatedEngine()))) as url:
        refused = post(url, "/v1/reward", {**group_body(2), "against": "score"})
        assert refused.status_code == 422 and refused.json()["field"] == "against"
        assert "--mode pointwise" in refused.json()["error"]


def test_cai_serve_defaults_to_the_cpu_recipes_judge():
    recipe = yaml.safe_load((ROOT / "pipelines/rlaif-tiny.yaml").read_text())["stages"]["judge"]
    args = cli.build_parser().parse_args(["serve"])
    _default_judge(args)
    assert args.mode == recipe["mode"] == "pointwise"
    assert args.constitution == recipe["constitution"]
    assert args.principles.split(",") == recipe["principles"]
    assert args.zero_shot is (not recipe["few_shot"])
    assert args.length_coef == recipe["length_coef"]
    pairwise = cli.build_parser().parse_args(["serve", "--mode", "pairwise"])
    _default_judge(pairwise)
    assert (pairwise.constitution, pairwise.principles) == ("harmless", None)
    assert (pairwise.zero_shot, pairwise.length_coef) == (False, 0.0)
    check_options(ServeOptions(against="score"), judge_mode="pointwise", reward_model=False)
    with pytest.raises(ValueError, match="--against score"):
        check_options(ServeOptions(against="score"), judge_mode="pairwise", reward_model=False)
    assert "mode" not in ServeOptions.__dataclass_fields__  # the judge's own settings.mode


# ---- 4. server hygiene -------------------------------------------------------------------------


def test_json_nested_5000_deep_is_a_400_naming_the_body():
    with running(Service(Judge(GatedEngine()))) as url:
        deep = '{"prompts": ' + "[" * 5000 + "]" * 5000 + ', "completions": []}'
        refused = post(url, "/v1/reward", deep)
        assert refused.status_code == 400, refused.text
        assert "body" in refused.json()["error"]
        assert metric(url, "cai_engine_errors_total", kind="judge") == 0


def test_a_client_leaving_mid_body_is_a_disconnect_not_a_500():
    with running(Service(Judge(GatedEngine()))) as url:
        with raw_request(url, b'{"prompts": [', 1000):
            pass  # closed with 987 bytes unsent
        wait_for(lambda: metric(url, "cai_client_disconnects_total") >= 1, "no disconnect")
        assert metric(url, "cai_requests_total", endpoint="/v1/reward", status="500") == 0
        assert metric(url, "cai_requests_total", endpoint="/v1/reward", status="499") == 1


def test_a_stalled_body_gets_408_within_the_read_timeout():
    with running(Service(Judge(GatedEngine()), options=ServeOptions(read_timeout_s=1))) as url:
        start = time.monotonic()
        with raw_request(url, b'{"pro', 1000) as s:
            s.settimeout(10)
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"--read-timeout" in answer
        assert time.monotonic() - start < 8


@pytest.mark.timeout(120)
def test_a_port_in_use_fails_with_one_line_before_any_banner():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "cai.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
        )
    assert done.returncode != 0
    assert "cai serve: http" not in done.stdout
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot serve on 127.0.0.1:{port}") and "in use" in line


# ---- 5. /v1/judge: an over-long pair is that pair's error, not the request's -----------------------


class Overflowing(ScriptedEngine):
    """``by_length``, but a score call with a conversation containing LONG raises, as an engine
    built with overflow="raise" does."""

    def __init__(self):
        super().__init__(by_length)

    def score(self, conversations, options, *, prefixes=None, progress=False):
        if any("LONG" in json.dumps(c) for c in conversations):
            raise PromptTooLong("conversation 0: 9000 tokens, over the model's context of 2048")
        return super().score(conversations, options, prefixes=prefixes, progress=progress)


def test_an_over_long_pair_gets_its_own_error_record_and_the_others_are_judged():
    local = Judge(ScriptedEngine(by_length))
    pairs = [("a", "bb"), ("LONG " * 3, "b"), ("aaa", "b")]
    body = {"pairs": [{"prompt": PROMPT, "response_a": a, "response_b": b} for a, b in pairs]}
    with running(Service(Judge(Overflowing()))) as url:
        judged = post(url, "/v1/judge", body)
        assert judged.status_code == 200, judged.text
        prefs = judged.json()["preferences"]
        assert prefs[1]["p_a"] is None and prefs[1]["winner"] is None
        assert "context" in prefs[1]["error"] and prefs[1]["principles"]
        for i in (0, 2):
            assert prefs[i]["error"] is None
            assert prefs[i]["p_a"] == local.compare(PROMPT, *pairs[i]).p_a
        refs = {
            "prompts": [PROMPT] * 3,
            "completions": [a for a, _ in pairs],
            "against": "reference",
        }
        rewards = post(url, "/v1/reward", {**refs, "references": [b for _, b in pairs]})
        assert rewards.json()["rewards"][1] is None
        assert [rewards.json()["rewards"][i] for i in (0, 2)] == [prefs[0]["p_a"], prefs[2]["p_a"]]


# ---- 6. engine failures told from bugs; /get_reward without torch ---------------------------------


def test_a_bug_is_an_internal_error_and_an_engine_failure_is_an_engine_failure(caplog):
    service = Service(Judge(GatedEngine(fail="BOOM")))

    def broken(*args, **kwargs):
        raise KeyError("a bug of the server")

    with running(service) as url, caplog.at_level(logging.ERROR, logger="cai.serve"):
        engine_failed = post(url, "/v1/judge", judge_body("BOOM", "b"))
        assert engine_failed.status_code == 500
        assert engine_failed.json()["error"].startswith("the engine failed on this batch: ")
        assert "RuntimeError: engine fell over on 'BOOM'" in engine_failed.json()["error"]
        service.reward_function = broken
        bug = post(url, "/v1/reward", group_body(2))
        assert bug.status_code == 500
        assert bug.json()["error"].startswith("internal error: KeyError")
        assert "engine" not in bug.json()["error"]
    [record] = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is KeyError


GET_REWARD_WITHOUT_TORCH = """
import json, sys, threading
sys.path.insert(0, {tests!r})
from fakes import ScriptedEngine
from cai.judge import Judge
from cai.serve import Service
from cai.serve.protocol import OpenRLHFBody
service = Service(Judge(ScriptedEngine(lambda c, p: 0.7)))
body = OpenRLHFBody(query=["Q?A", "Q?B"], prompts=["Q?", "Q?"], labels=["R", "R"])
out = service.openrlhf(body, threading.Event())
service.close()
print(json.dumps({{"torch": "torch" in sys.modules, "out": out}}))
"""


@pytest.mark.timeout(120)
def test_get_reward_answers_plain_lists_without_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = GET_REWARD_WITHOUT_TORCH.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=90
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    local = openrlhf_reward_func(
        JudgeReward(Judge(ScriptedEngine(lambda c, p: 0.7)), against="reference")
    )(["Q?A", "Q?B"], ["Q?", "Q?"], ["R", "R"])
    assert got["out"] == {k: v.tolist() if k != "extra_logs" else v for k, v in local.items()}


# ---- the real pointwise judge --------------------------------------------------------------------


@pytest.mark.slow
def test_real_recipe_judge_serves_the_in_process_pointwise_scores(hf_engine):
    # The default judge of cai serve (the recipes'), on the real model: what /get_reward gives
    # without labels is JudgeReward(judge, mode="pointwise") in-process.
    args = cli.build_parser().parse_args(["serve"])
    _default_judge(args)
    settings = {
        "mode": args.mode,
        "principles": args.principles.split(","),
        "few_shot": not args.zero_shot,
        "length_coef": args.length_coef,
    }
    judge = Judge(hf_engine, args.constitution, **settings)
    answers = ["Boil it for nine minutes, then cool it in cold water.", "Figure it out, idiot."]
    want = JudgeReward(judge, mode="pointwise")([PROMPT] * 2, answers)
    with running(Service(Judge(hf_engine, args.constitution, **settings))) as url:
        out = post(
            url, "/get_reward", {"query": [PROMPT + a for a in answers], "prompts": [PROMPT] * 2}
        )
    assert out.status_code == 200, out.text
    assert out.json()["rewards"] == pytest.approx(want, abs=1e-4)
