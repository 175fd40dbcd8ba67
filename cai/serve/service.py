"""``cai serve``: the judge and/or a trained reward model as an HTTP service for RL trainers.

    cai serve --model smollm2-135m --constitution harmless [--reward-model DIR] [--port 8000]

RL trainers at scale call a reward server instead of loading a judge into every rollout worker.
The models load once; every request goes through one :class:`cai.serve.batching.Batcher`, so requests
from many workers become the engine's large batches (``--max-batch`` items, waiting at most
``--max-wait-ms`` for more), one engine call at a time, while the server keeps accepting.

Endpoints (JSON in and out; an error is ``{"error": "<field>: <what is wrong>", "field": ...}``):

``POST /get_reward``  OpenRLHF's remote reward (``--reward.remote_url``, formerly
    ``--remote_rm_url``): ``{"query": [prompt + response], "prompts": [...], "labels": [...]}``
    → ``{"rewards": [...], "scores": [...], "extra_logs": {}}``, the values of
    ``cai.rewards.openrlhf_reward_func`` in-process (the response is what follows the prompt in
    its query; labels are the references); the server's ``--against`` decides the reward. An
    unscored pair is NaN, as in-process.
``POST /v1/reward``  ``{"prompts", "completions", "references"?, "against"?, "num_generations"?,
    "centered"?, "scorer"?}`` → ``{"rewards": [float | null]}``: the values ``JudgeReward`` (or
    ``RewardModelReward``) gives; what ``cai.rewards.RemoteReward`` calls.
``POST /v1/judge``  ``{"pairs": [{"prompt", "response_a", "response_b", "key"?}]}`` →
    ``{"preferences": [...]}``, the fields of ``Judge.label``'s ``Preference``.
``GET /health``, ``GET /metrics`` (Prometheus text: requests by endpoint and status, items and
    batch sizes, engine calls and errors, queue length, latency quantiles, disconnects).

Faults stay with their request: malformed JSON is 400; a missing or mistyped field, or lists of
different lengths, 422 naming the field; a body over ``--max-body-mb`` or more than
``--max-items`` items, 413; a full queue, 503 with Retry-After; with ``--api-key``, a request
without ``Authorization: Bearer KEY`` is 401 (``/health`` stays open). An engine exception fails
the requests of its batch (500 with the reason) and the server goes on. A client that
disconnects is dropped from the queue. SIGTERM (or Ctrl-C) stops accepting, answers the requests
in flight, then exits 0.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from typing import Any

import anyio

from cai.judge.judge import Judge
from cai.judge.pair import JudgePair
from cai.rewards.functions import JudgeReward, RewardModelReward, Scorer
from cai.rewards.hooks import openrlhf_reward_func
from cai.serve.batching import Batcher
from cai.serve.metrics import Metrics
from cai.serve.protocol import (
    Against,
    BadRequest,
    JudgeBody,
    OpenRLHFBody,
    RewardBody,
    ServeOptions,
    _same_length,
    resolved_against,
)


class _CoalescedJudge:
    """Stands in for the judge inside one request's reward: its labels go through the batcher."""

    def __init__(self, batcher: Batcher, cancelled: threading.Event):
        self.batcher, self.cancelled = batcher, cancelled

    def label(self, pairs, *, progress: bool | str = False):
        return self.batcher.call("judge", pairs, self.cancelled)


class _CoalescedScorer:
    """Stands in for the reward model inside one request's reward, like ``_CoalescedJudge``."""

    def __init__(self, batcher: Batcher, cancelled: threading.Event):
        self.batcher, self.cancelled = batcher, cancelled

    def score(self, conversations):
        return self.batcher.call("reward_model", conversations, self.cancelled)


class Service:
    """The loaded judge and/or reward model behind one batcher; what the endpoints call."""

    def __init__(
        self,
        judge: Judge | None = None,
        reward_model: Scorer | None = None,
        options: ServeOptions | None = None,
        *,
        reward_model_name: str | None = None,
    ):
        if judge is None and reward_model is None:
            raise ValueError("a service needs a judge, a reward model or both")
        self.judge, self.reward_model = judge, reward_model
        self.reward_model_name = reward_model_name
        self.options = options or ServeOptions()
        self.metrics = Metrics()
        calls: dict[str, Callable] = {}
        if judge is not None:
            calls["judge"] = judge.label
        if reward_model is not None:
            calls["reward_model"] = reward_model.score
        self.batcher = Batcher(
            calls,
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            max_queue=self.options.max_queue,
            observer=self.metrics,
        )
        # /get_reward's adapter returns torch tensors: import torch now, not on the first request.
        importlib.import_module("torch")
        # Request threads mostly wait on the batcher; enough of them that every concurrent
        # request can be queued for the same batch (anyio's default is 40).
        self.threads = anyio.CapacityLimiter(max(256, 4 * self.options.max_batch))

    def close(self) -> None:
        """Finish the queued work, then close the judge (its engine, if it built it)."""
        self.batcher.close()
        if self.judge is not None:
            self.judge.close()
        close = getattr(self.reward_model, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, Any]:
        judge = self.judge
        return {
            "judge": None if judge is None else judge.engine.model_name,
            "constitution": None if judge is None else judge.constitution.name,
            "mode": self.options.mode,
            "reward_model": self.reward_model_name,
            "against": self.default_against,
        }

    @property
    def default_against(self) -> Against:
        return resolved_against(self.options, judge=self.judge is not None)

    def reward_function(
        self,
        cancelled: threading.Event,
        *,
        scorer: str | None = None,
        against: Against | None = None,
        num_generations: int | None = None,
        centered: bool | None = None,
    ) -> JudgeReward | RewardModelReward:
        """The reward a request asks for (unset fields: the server's flags), its judge or reward
        model calls coalesced with every other request's. The one place a reward is built."""
        scorer = scorer or ("judge" if self.judge is not None else "reward_model")
        against = against or self.default_against
        if num_generations is None and against == "group":
            num_generations = self.options.num_generations
        centered = self.options.centered if centered is None else centered
        if scorer == "judge":
            if self.judge is None:
                raise BadRequest(
                    422, "scorer: this server has no judge (start it with --model)", "scorer"
                )
            if against == "score":
                raise BadRequest(
                    422,
                    "against: 'score' is a reward model's raw score; the judge compares",
                    "against",
                )
            coalesced: Any = _CoalescedJudge(self.batcher, cancelled)
            return JudgeReward(
                coalesced, against=against, num_generations=num_generations, centered=centered
            )
        if self.reward_model is None:
            raise BadRequest(
                422,
                "scorer: this server has no reward model (start it with --reward-model)",
                "scorer",
            )
        return RewardModelReward(
            _CoalescedScorer(self.batcher, cancelled),
            against=None if against == "score" else against,
            num_generations=num_generations,
            centered=centered,
        )

    def check_items(self, name: str, count: int) -> None:
        if count > self.options.max_items:
            raise BadRequest(
                413,
                f"{name}: {count} items; at most {self.options.max_items} per request "
                "(cai serve --max-items): split the batch",
                name,
            )

    # The endpoints' work, run in a worker thread (it blocks on the batcher).

    def reward(self, body: RewardBody, cancelled: threading.Event) -> list[float | None]:
        self.check_items("completions", len(body.completions))
        _same_length("completions", body.completions, "prompts", len(body.prompts))
        if body.references is not None:
            _same_length("references", body.references, "completions", len(body.completions))
        reward = self.reward_function(
            cancelled,
            scorer=body.scorer,
            against=body.against,
            num_generations=body.num_generations,
            centered=body.centered,
        )
        extra = {} if body.references is None else {reward.reference_key: body.references}
        return reward(body.prompts, body.completions, **extra)

    def openrlhf(self, body: OpenRLHFBody, cancelled: threading.Event) -> dict[str, Any]:
        self.check_items("query", len(body.query))
        _same_length("prompts", body.prompts, "query", len(body.query))
        labels = body.labels if body.labels is not None else [None] * len(body.query)
        _same_length("labels", labels, "query", len(body.query))
        if self.default_against == "reference":
            for i, label in enumerate(labels):
                if not isinstance(label, str) or not label.strip():
                    raise BadRequest(
                        422,
                        f"labels[{i}]: the reference response (OpenRLHF's --label_key column) "
                        f"must be a non-empty string, got {json.dumps(label)[:80]}",
                        "labels",
                    )
        out = openrlhf_reward_func(self.reward_function(cancelled))(
            body.query, body.prompts, labels
        )
        return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}

    def label(self, body: JudgeBody, cancelled: threading.Event) -> list[dict]:
        if self.judge is None:
            raise BadRequest(422, "pairs: this server has no judge (start it with --model)")
        self.check_items("pairs", len(body.pairs))
        pairs = [JudgePair(p.prompt, p.response_a, p.response_b, p.key) for p in body.pairs]
        return [pref.to_dict() for pref in self.batcher.call("judge", pairs, cancelled)]


__all__ = ["Service"]
