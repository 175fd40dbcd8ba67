"""Defects a hostile probe found in the rewards: an over-long completion in a pointwise batch, a
``cai serve`` server that answers nonsense or drips its answer, and completions made only of
invisible characters. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_judge_pointwise import GOOD, ScoreEngine, fixed
from test_judge_pointwise import PROMPT as POINTWISE_PROMPT
from test_rewards import PROMPT, FakeRewardModel, X, Y, engine

from cai.engine import PromptTooLong
from cai.judge import Judge
from cai.rewards.functions import JudgeReward, RewardModelReward
from cai.rewards.remote import RemoteReward, RemoteRewardError

# ---- 1. an over-long completion in a pointwise batch -----------------------------------------------

OVERLONG = "word " * 9000  # longer than SmolLM2's 8192-token context


class TooLongScoreEngine(ScoreEngine):
    """Raises as a real engine (overflow="raise") does when any request holds OVERLONG."""

    def score(self, conversations, options, *, prefixes=None, progress=False):
        if any(OVERLONG in c[-1]["content"] for c in conversations):
            raise PromptTooLong("conversation 0: prompt exceeds the model's context")
        return super().score(conversations, options, prefixes=prefixes, progress=progress)


def test_pointwise_reward_gives_none_to_a_completion_too_long_for_the_judge_alone():
    reward = JudgeReward(Judge(TooLongScoreEngine(fixed), mode="pointwise"), mode="pointwise")
    prompts = [POINTWISE_PROMPT] * 3
    # sigmoid(ln 8) = 8 / 9 for GOOD (test_judge_pointwise's FIXED).
    assert reward(prompts, [GOOD, OVERLONG, GOOD]) == [pytest.approx(8 / 9), None, 8 / 9]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_pointwise_reward_gives_none_to_an_overlong_completion_alone(hf_engine):
    reward = JudgeReward(Judge(hf_engine, mode="pointwise"), mode="pointwise")
    out = reward(prompts=["q"] * 3, completions=["a", OVERLONG, "b"])
    assert out[1] is None
    assert all(isinstance(r, float) and 0 < r < 1 for r in (out[0], out[2]))


# ---- 2. a server that answers nonsense, or drips -----------------------------------------------------


@contextlib.contextmanager
def answering(status: int, body: bytes, content_type: str, drip_s: float = 0.0) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every POST with ``body`` (one byte every ``drip_s``
    seconds, at most 60 of them, if given); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if drip_s:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for byte in b"Content-Type: application/json\r\n"[:60]:
                    if stop.wait(drip_s):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                return
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    stop = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


JSON = "application/json"
MALFORMED = [
    (200, b"<html><body>Welcome to nginx!</body></html>", "text/html", "not JSON"),
    (200, b'{"scores": [0.5, 0.5]}', JSON, "no 'rewards' field"),
    (200, b"[0.5, 0.5]", JSON, "not a JSON object"),
    (200, b'{"rewards": "0.5, 0.5"}', JSON, "'rewards' is not a list"),
    (200, b'{"rewards": ["0.5", "0.5"]}', JSON, "reward 0 is not a number"),
    (200, b'{"rewards": [0.5, true]}', JSON, "reward 1 is not a number"),
    (200, b'{"rewards": [0.5]}', JSON, "1 rewards for 2 completions"),
    (200, b'{"rewards": [0.5, 0.5, 0.5]}', JSON, "3 rewards for 2 completions"),
    (500, b"[1, 2]", JSON, r"HTTP 500: \[1, 2\]"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "body", "content_type", "why"), MALFORMED)
def test_remote_reward_refuses_a_malformed_answer_naming_the_url(status, body, content_type, why):
    with answering(status, body, content_type) as url:
        remote = RemoteReward(url, against="group", num_generations=2, timeout=10)
        match = re.escape(f"{url}/v1/reward: ") + ".*" + why
        with pytest.raises(RemoteRewardError, match=match):
            remote([PROMPT] * 2, [X, Y])
        with pytest.raises(RemoteRewardError, match=match):
            asyncio.run(remote.as_async()([PROMPT] * 2, [X, Y]))


@pytest.mark.timeout(30)
def test_remote_reward_accepts_numbers_and_nulls():
    with answering(200, b'{"rewards": [1, null]}', JSON) as url:
        remote = RemoteReward(url, against="group", num_generations=2, timeout=10)
        assert remote([PROMPT] * 2, [X, Y]) == [1.0, None]

        async def in_a_notebook():  # a sync call from inside a running event loop
            return remote([PROMPT] * 2, [X, Y])

        assert asyncio.run(in_a_notebook()) == [1.0, None]


@pytest.mark.timeout(30)
def test_remote_reward_timeout_is_a_total_for_the_call_against_a_dripping_server():
    with answering(200, b"", JSON, drip_s=0.3) as url:
        remote = RemoteReward(url, against="group", num_generations=2, timeout=1.5)
        for call in (remote, lambda p, c: asyncio.run(remote.as_async()(p, c))):
            start = time.monotonic()
            with pytest.raises(RemoteRewardError, match=re.escape(f"{url}/v1/reward: no answer")):
                call([PROMPT] * 2, [X, Y])
            assert time.monotonic() - start < 3.0


@pytest.mark.timeout(30)
def test_remote_reward_timeout_includes_the_waits_between_retries():
    with answering(503, b'{"error": "overloaded"}', JSON) as url:
        remote = RemoteReward(
            url, against="group", num_generations=2, timeout=1.0, retries=20, backoff=0.4
        )
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=re.escape("no answer within 1.0 s")):
            remote([PROMPT] * 2, [X, Y])
        assert time.monotonic() - start < 2.5


# ---- 3. completions made of invisible characters ----------------------------------------------------

INVISIBLE = ["\u200b\u200b", "\u200c", "\u200d \u2060", "\ufeff\n", "\u00a0\u3000\t"]


def test_is_empty_counts_whitespace_and_zero_width_characters():
    from cai.rewards.functions import is_empty

    for text in ["", "  ", *INVISIBLE]:
        assert is_empty(text), repr(text)
    for text in ["a", "\u200ba", ".", "\u200d\U0001f600"]:
        assert not is_empty(text), repr(text)


def test_a_completion_of_zero_width_characters_is_empty():
    fake = engine()
    group = JudgeReward(Judge(fake), against="group", num_generations=2)
    for blank in INVISIBLE:
        assert group([PROMPT] * 2, [X, blank]) == [1.0, 0.0]
        assert group([PROMPT] * 2, [blank, "  "]) == [0.5, 0.5]
    reference = JudgeReward(Judge(fake), against="reference")
    assert reference([PROMPT], ["\u200b\u200b"], reference=[Y]) == [0.0]
    with pytest.raises(ValueError, match="reference 0: the reference response is empty"):
        reference([PROMPT], [X], reference=["\u200b"])
    assert fake.score_calls == []  # never shown to the judge

    scores = ScoreEngine(fixed)
    pointwise = JudgeReward(Judge(scores, mode="pointwise"), mode="pointwise")
    assert pointwise([POINTWISE_PROMPT] * 2, [GOOD, "\u200b\u200b"]) == [
        pytest.approx(8 / 9),
        0.0,
    ]
    assert scores.requests == 1

    rm = FakeRewardModel({X: 2.0})
    rm_group = RewardModelReward(rm, against="group", num_generations=2)
    assert rm_group([PROMPT] * 2, [X, "\u200b"]) == [1.0, 0.0]
