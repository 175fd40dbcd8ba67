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
    its query; labels are the references); the server's ``--against`` decides the reward (by
    default a pointwise judge's own score of each response: no labels needed). An unscored pair
    is NaN, as in-process.
``POST /v1/reward``  ``{"prompts", "completions", "references"?, "against"?, "num_generations"?,
    "centered"?, "scorer"?}`` → ``{"rewards": [float | null]}``: the values ``JudgeReward`` (or
    ``RewardModelReward``) gives; what ``cai.rewards.RemoteReward`` calls.
``POST /v1/judge``  ``{"pairs": [{"prompt", "response_a", "response_b", "key"?}]}`` →
    ``{"preferences": [...]}``, the fields of ``Judge.label``'s ``Preference`` (a pair too long
    for the judge's context gets a record with its ``error`` set, as ``/v1/reward`` gets null).
``POST /v1/classify``  ``{"inputs": [prompt or messages], "outputs"?: [{"messages",
    "response"}]}`` → ``{"input": [{"p", "flagged"}], "output": [...]}``: ``--guard``'s
    ``cai.classify.Guard`` verdicts (an output's response may be a prefix, as it streams).
``GET /health``, ``GET /metrics`` (Prometheus text: requests by endpoint and status, items and
    batch sizes, engine calls and errors, queue length, latency quantiles, disconnects).

Faults stay with their request: malformed (or too deeply nested) JSON is 400; a missing or
mistyped field, lists of different lengths or a pair the judge refuses (checked before it joins
a batch), 422 naming the field; a body over ``--max-body-mb``, more than ``--max-items``
completions, or more engine items (judge pairs: a group of G is G(G-1)/2) than ``--max-pairs``
or ``--max-queue``, 413; a full queue, 503 with Retry-After; a body not sent within
``--read-timeout``, 408; with ``--api-key``, a request without ``Authorization: Bearer KEY`` is
401 (``/health`` stays open). An engine exception fails the requests of its batch (500, "the
engine failed") and the server goes on; a bug of this server is a 500 "internal error", logged. A client that
disconnects is dropped from the queue. SIGTERM (or Ctrl-C) stops accepting, answers the requests
in flight, then exits 0.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from cai.judge.judge import Judge
from cai.judge.pair import JudgePair, check_pair
from cai.rewards.functions import JudgeReward, RewardModelReward, Scorer
from cai.serve.batching import Batcher
from cai.serve.metrics import Metrics
from cai.serve.protocol import (
    Against,
    BadRequest,
    ClassifyBody,
    JudgeBody,
    OpenRLHFBody,
    RewardBody,
    ServeOptions,
    _same_length,
    resolved_against,
)

if TYPE_CHECKING:  # torch loads with a guard, not with the server
    from cai.classify import Guard

UNITS = {
    "judge": "judge pairs",
    "score": "scored responses",
    "reward_model": "reward-model conversations",
    "classify_input": "input checks",
    "classify_output": "output checks",
}
"""What one engine item of each batch kind is, for the 413 that names the limit."""


class _Coalesced:
    """Stands in for the judge (or the reward model) inside one request's reward: its engine
    calls go through the service's per-request limit, then the batcher."""

    def __init__(self, service: Service, cancelled: threading.Event):
        self.service, self.cancelled = service, cancelled

    @property
    def mode(self) -> str:
        return self.service.judge.settings.mode  # type: ignore[union-attr]

    def label(self, pairs, *, progress: bool | str = False):
        return self.service.submit("judge", pairs, self.cancelled)

    def score_responses(self, responses, *, progress: bool | str = False):
        return self.service.submit("score", responses, self.cancelled)

    def score(self, conversations):
        return self.service.submit("reward_model", conversations, self.cancelled)


def _reason(error: ValueError) -> str:
    """check_pair's message without its "pair i: " (the caller names the item its own way)."""
    return str(error).split(": ", 1)[-1]


class Service:
    """The loaded judge and/or reward model behind one batcher; what the endpoints call."""

    def __init__(
        self,
        judge: Judge | None = None,
        reward_model: Scorer | None = None,
        options: ServeOptions | None = None,
        *,
        reward_model_name: str | None = None,
        guard: Guard | None = None,
    ):
        if judge is None and reward_model is None and guard is None:
            raise ValueError("a service needs a judge, a reward model or a guard")
        self.judge, self.reward_model, self.guard = judge, reward_model, guard
        self.reward_model_name = reward_model_name
        self.options = options or ServeOptions()
        self.metrics = Metrics()
        calls: dict[str, Callable] = {}
        if judge is not None:
            # Judge.label and score_responses give a request too long for the judge's context
            # its own error, so one over-long item never fails its batch.
            calls["judge"] = judge.label
            if judge.settings.mode == "pointwise":
                calls["score"] = judge.score_responses
        if reward_model is not None:
            calls["reward_model"] = reward_model.score
        if guard is not None:
            if "input" in guard.classifiers:
                calls["classify_input"] = guard.check_inputs
            if "output" in guard.classifiers:
                calls["classify_output"] = guard.check_outputs
        self.batcher = Batcher(
            calls,
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            max_queue=self.options.max_queue,
            observer=self.metrics,
        )
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
        if self.guard is not None:
            self.guard.close()

    @property
    def judge_mode(self) -> str | None:
        return None if self.judge is None else self.judge.settings.mode

    def describe(self) -> dict[str, Any]:
        judge = self.judge
        return {
            "judge": None if judge is None else judge.engine.model_name,
            "constitution": None if judge is None else judge.constitution.name,
            "mode": self.judge_mode,
            "reward_model": self.reward_model_name,
            "against": self.default_against,
            "guard": None if self.guard is None else self.guard.kinds,
        }

    @property
    def default_against(self) -> Against:
        return resolved_against(self.options, judge_mode=self.judge_mode)

    # ---- the batch functions (the batcher's worker thread) -----------------------------------

    # ---- admission (the request's thread) ----------------------------------------------------

    def check_size(self, count: int, limit: int, message: str, field: str | None) -> None:
        """The one size check: 413 (never retryable) naming the limit and what it counts."""
        if count > limit:
            raise BadRequest(413, f"{message}; split the request", field)

    def check_items(self, name: str, count: int) -> None:
        what = name if name in ("pairs", "inputs", "outputs") else "completions"
        self.check_size(
            count,
            self.options.max_items,
            f"{name}: {count} items; at most {self.options.max_items} {what} per request "
            "(cai serve --max-items)",
            name,
        )

    def submit(self, kind: str, items: Sequence, cancelled: threading.Event) -> list:
        """One request's engine items, through the batcher; 413 for a request that can never
        fit (over ``--max-pairs``, or over the whole ``--max-queue``, where 503 would be
        retried forever)."""
        o = self.options
        limit, flag = min((o.max_pairs, "--max-pairs"), (o.max_queue, "--max-queue"))
        unit = UNITS[kind]
        hint = " (a group of G completions is G(G-1)/2 pairs)" if kind == "judge" else ""
        self.check_size(
            len(items),
            limit,
            f"this request needs {len(items)} {unit}{hint}; at most {limit} {unit} per request "
            f"(cai serve {flag})",
            None,
        )
        return self.batcher.call(kind, items, cancelled)

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        """422 naming the prompt the judge would refuse, before its pairs join a batch (where
        the refusal would make every request of the batch run alone)."""
        if self.judge is None:
            return
        for i, prompt in enumerate(prompts):
            try:
                check_pair((prompt, "-", "-"), i)
            except ValueError as e:
                raise BadRequest(422, f"prompts[{i}]: {_reason(e)}", "prompts") from None

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
        coalesced: Any = _Coalesced(self, cancelled)
        if scorer == "judge":
            if self.judge is None:
                raise BadRequest(
                    422, "scorer: this server has no judge (start it with --model)", "scorer"
                )
            if against == "score" and self.judge_mode != "pointwise":
                raise BadRequest(
                    422,
                    "against: 'score' is a completion's own score, the pointwise judge's "
                    "(cai serve --mode pointwise) or a reward model's; this judge compares",
                    "against",
                )
            return JudgeReward(
                coalesced,
                against=None if against == "score" else against,
                num_generations=num_generations,
                centered=centered,
            )
        if self.reward_model is None:
            raise BadRequest(
                422,
                "scorer: this server has no reward model (start it with --reward-model)",
                "scorer",
            )
        return RewardModelReward(
            coalesced,
            against=None if against == "score" else against,
            num_generations=num_generations,
            centered=centered,
        )

    # ---- the endpoints' work, run in a worker thread (it blocks on the batcher) ---------------

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
        if isinstance(reward, JudgeReward):
            self.check_prompts(body.prompts)
        extra = {} if body.references is None else {reward.reference_key: body.references}
        return reward(body.prompts, body.completions, **extra)

    def openrlhf(self, body: OpenRLHFBody, cancelled: threading.Event) -> dict[str, Any]:
        """``openrlhf_reward_func``'s values as plain JSON lists (no torch in the server)."""
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
        responses = []
        for i, (query, prompt) in enumerate(zip(body.query, body.prompts, strict=True)):
            if not query.startswith(prompt):
                raise BadRequest(422, f"query {i} does not start with its prompt", "query")
            responses.append(query[len(prompt) :])
        reward = self.reward_function(cancelled)
        if isinstance(reward, JudgeReward):
            self.check_prompts(body.prompts)
        values = reward(list(body.prompts), responses, **{reward.reference_key: list(labels)})
        rewards = [math.nan if r is None else float(r) for r in values]
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    def label(self, body: JudgeBody, cancelled: threading.Event) -> list[dict]:
        if self.judge is None:
            raise BadRequest(422, "pairs: this server has no judge (start it with --model)")
        self.check_items("pairs", len(body.pairs))
        pairs = [JudgePair(p.prompt, p.response_a, p.response_b, p.key) for p in body.pairs]
        for i, pair in enumerate(pairs):
            try:
                check_pair(pair, i)
            except ValueError as e:
                raise BadRequest(422, str(e), "pairs") from None
        return [pref.to_dict() for pref in self.submit("judge", pairs, cancelled)]

    def classify(self, body: ClassifyBody, cancelled: threading.Event) -> dict[str, list]:
        """The guard's verdicts (``Guard.check_inputs`` / ``check_outputs``), each list through
        the batcher; an empty list asks nothing of its classifier."""
        if self.guard is None:
            raise BadRequest(422, "inputs: this server has no guard (start it with --guard)")
        self.check_items("inputs", len(body.inputs))
        self.check_items("outputs", len(body.outputs))
        out: dict[str, list] = {"input": [], "output": []}
        asked = (("inputs", "input", body.inputs), ("outputs", "output", body.outputs))
        for field, kind, items in asked:
            if items and kind not in self.guard.classifiers:
                raise BadRequest(
                    422, f"{field}: this server's guard has no {kind} classifier", field
                )
        if body.inputs:
            verdicts = self.submit("classify_input", list(body.inputs), cancelled)
            out["input"] = [{"p": v.p, "flagged": v.flagged} for v in verdicts]
        if body.outputs:
            items = [(o.messages, o.response) for o in body.outputs]
            verdicts = self.submit("classify_output", items, cancelled)
            out["output"] = [{"p": v.p, "flagged": v.flagged} for v in verdicts]
        return out


__all__ = ["Service"]
