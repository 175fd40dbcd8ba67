"""``RemoteReward``: a reward function computed by a ``cai serve`` server (``cai.serve``), so
that many trainer workers share one loaded judge (README: "Serving the judge")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal

import httpx

from cai.rewards.functions import Against, _PairwiseReward


class RemoteRewardError(RuntimeError):
    """A ``cai serve`` server refused a reward request, or could not be reached."""


MAX_BACKOFF = 10.0
"""The longest wait between two tries of ``RemoteReward``, in seconds."""

# Worth another try: the server is not up (yet), or closed the connection (restarting, draining).
_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class RemoteReward(_PairwiseReward):
    """``JudgeReward`` (or ``RewardModelReward``) computed by a ``cai serve`` server: the same
    call, arguments and values, one POST to ``URL/v1/reward`` per call, so many trainer workers
    share one loaded judge whose batches the server fills from all of them.

    Call it like ``JudgeReward``, or give TRL ``reward.as_async()`` (an ``async`` function, which
    TRL runs concurrently with its other reward functions). ``verl_compute_score(reward)`` makes
    it verl's ``compute_score``. Connection errors and 503 (server starting, overloaded or
    draining) are retried ``retries`` times, waiting ``backoff`` seconds and doubling (at most
    ``MAX_BACKOFF``); any other failure, or no answer within ``timeout`` seconds, raises
    ``RemoteRewardError`` naming the URL.
    """

    def __init__(
        self,
        url: str,
        *,
        against: Against | None = "group",
        num_generations: int | None = None,
        reference_key: str = "reference",
        centered: bool = False,
        name: str | None = None,
        scorer: Literal["judge", "reward_model"] | None = None,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
    ):
        """
        Args:
            url: the server, such as ``http://127.0.0.1:8000``.
            against: as in ``JudgeReward``; None: a reward model's raw score.
            scorer: ``"judge"`` or ``"reward_model"`` where the server has both; None: its
                judge if it has one.
            api_key: the server's ``--api-key``, sent as a bearer token.
        """
        super().__init__(
            against,
            num_generations,
            reference_key,
            centered,
            name or f"remote_{against or 'score'}",
        )
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        self.endpoint = url.rstrip("/") + "/v1/reward"
        self.scorer = scorer
        self.headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._client: httpx.Client | None = None
        # One TLS context for every client this reward makes: building one costs ~0.1 s, too
        # much for each call of ``as_async`` (its clients cannot outlive their event loop).
        self._tls = httpx.create_ssl_context()

    def _payload(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict) -> dict:
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts but {len(completions)} completions: expected one prompt "
                "per completion"
            )
        payload = {
            "prompts": list(prompts),
            "completions": list(completions),
            "against": self.against or "score",
            "num_generations": self.num_generations,
            "centered": self.centered,
            "scorer": self.scorer,
        }
        if self.against == "reference":
            payload["references"] = self._references(kwargs, len(completions))
        return payload

    def _delays(self):
        """The wait before each try: none before the first, then ``backoff`` doubling, at most
        ``MAX_BACKOFF`` seconds."""
        yield 0.0
        for attempt in range(self.retries):
            yield min(self.backoff * 2**attempt, MAX_BACKOFF)

    def _tries(self) -> Generator[float, httpx.Response | httpx.TransportError, list]:
        """The retry rule, for both clients: yields the wait before each try, is sent the try's
        response (or transport error), returns the rewards or raises ``RemoteRewardError``."""
        last: object = None
        for delay in self._delays():
            outcome = yield delay
            if isinstance(outcome, _RETRIED):
                last = outcome
                continue
            if isinstance(outcome, httpx.TimeoutException):
                raise RemoteRewardError(f"{self.endpoint}: no answer within {self.timeout} s")
            if isinstance(outcome, httpx.TransportError):
                raise RemoteRewardError(f"{self.endpoint}: {type(outcome).__name__}: {outcome}")
            if outcome.status_code == 503:
                last = "HTTP 503: the server is overloaded or shutting down"
                continue
            try:
                body = outcome.json()
            except ValueError:
                body = {"error": outcome.text[:200]}
            if outcome.status_code != 200:
                raise RemoteRewardError(
                    f"{self.endpoint}: HTTP {outcome.status_code}: {body.get('error', body)}"
                )
            return [None if r is None else float(r) for r in body["rewards"]]
        raise RemoteRewardError(
            f"{self.endpoint}: no answer after {self.retries + 1} tries ({last}); is `cai serve` "
            "running there?"
        )

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        payload = self._payload(prompts, completions, kwargs)
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, verify=self._tls)
        tries = self._tries()
        delay = next(tries)
        while True:
            time.sleep(delay)
            try:
                outcome = self._client.post(self.endpoint, json=payload, headers=self.headers)
            except httpx.TransportError as e:
                outcome = e
            try:
                delay = tries.send(outcome)
            except StopIteration as done:
                return done.value

    def as_async(self) -> Callable[..., Any]:
        """This reward as an ``async`` function of the same arguments (for TRL's concurrent
        reward functions), with the same ``__name__``."""

        async def reward(
            prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
        ) -> list[float | None]:
            payload = self._payload(prompts, completions, kwargs)
            tries = self._tries()
            delay = next(tries)
            async with httpx.AsyncClient(timeout=self.timeout, verify=self._tls) as client:
                while True:
                    await asyncio.sleep(delay)
                    try:
                        outcome = await client.post(
                            self.endpoint, json=payload, headers=self.headers
                        )
                    except httpx.TransportError as e:
                        outcome = e
                    try:
                        delay = tries.send(outcome)
                    except StopIteration as done:
                        return done.value

        reward.__name__ = self.__name__
        return reward

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


__all__ = ["RemoteReward", "RemoteRewardError"]
