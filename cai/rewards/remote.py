"""``RemoteReward``: a reward function computed by a ``cai serve`` server (``cai.serve``), so
that many trainer workers share one loaded judge (docs/guides/serve.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NoReturn

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
    ``MAX_BACKOFF``); any other failure, an answer that is not ``{"rewards": [...]}`` with one
    number or null per completion, or no answer within ``timeout`` seconds (a total for the
    call: every try and every wait between tries) raises ``RemoteRewardError`` naming the URL.
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
            timeout: seconds for the whole call, retries and their waits included.
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
        # One TLS context for every client this reward makes: building one costs ~0.1 s, too
        # much for each call (a call's client cannot outlive the call's event loop).
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

    async def _call(self, payload: dict) -> list[float | None]:
        """The whole call, tries and waits between them, within ``timeout`` seconds. httpx's
        own timeouts bound each read, not the call: a server that sends a byte a second would
        hold it forever, so the deadline is the event loop's, which cancels the read."""
        async with httpx.AsyncClient(timeout=self.timeout, verify=self._tls) as client:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._tries(client, payload)
            except TimeoutError:
                raise RemoteRewardError(
                    f"{self.endpoint}: no answer within {self.timeout} s (the call's timeout, "
                    "its retries included)"
                ) from None

    async def _tries(self, client: httpx.AsyncClient, payload: dict) -> list[float | None]:
        """Connection errors and 503 are tried again after the next delay; anything else is
        the answer, or a ``RemoteRewardError``."""
        last: object = None
        for delay in self._delays():
            await asyncio.sleep(delay)
            try:
                response = await client.post(self.endpoint, json=payload, headers=self.headers)
            except _RETRIED as e:
                last = e
                continue
            except httpx.TimeoutException:
                raise RemoteRewardError(
                    f"{self.endpoint}: no answer within {self.timeout} s"
                ) from None
            except httpx.TransportError as e:
                raise RemoteRewardError(f"{self.endpoint}: {type(e).__name__}: {e}") from e
            if response.status_code == 503:
                last = "HTTP 503: the server is overloaded or shutting down"
                continue
            return self._rewards(response, len(payload["completions"]))
        raise RemoteRewardError(
            f"{self.endpoint}: no answer after {self.retries + 1} tries ({last}); is `cai serve` "
            "running there?"
        )

    def _rewards(self, response: httpx.Response, count: int) -> list[float | None]:
        """The rewards of a 200 answer, checked: a proxy's HTML page or another server's JSON
        must not become rewards (or a KeyError deep in the trainer)."""
        try:
            body = response.json()
        except ValueError:
            body = None
            if response.status_code == 200:
                self._refuse(
                    f"the answer is not JSON ({response.headers.get('content-type')}): "
                    f"{response.text[:200]!r}"
                )
        if response.status_code != 200:
            error = body.get("error", body) if isinstance(body, dict) else body
            self._refuse(f"HTTP {response.status_code}: {error or response.text[:200]}")
        if not isinstance(body, dict):
            self._refuse(f"the answer is not a JSON object but a {_json_type(body)}")
        if "rewards" not in body:
            self._refuse(f"the answer has no 'rewards' field (its fields: {sorted(body)[:10]})")
        rewards = body["rewards"]
        if not isinstance(rewards, list):
            self._refuse(f"'rewards' is not a list but a {_json_type(rewards)}")
        if len(rewards) != count:
            self._refuse(f"{len(rewards)} rewards for {count} completions")
        for i, r in enumerate(rewards):
            # bool is an int to Python, but a JSON true is no reward
            if r is not None and (isinstance(r, bool) or not isinstance(r, int | float)):
                self._refuse(f"reward {i} is not a number or null: {r!r:.50}")
        return [None if r is None else float(r) for r in rewards]

    def _refuse(self, why: str) -> NoReturn:
        raise RemoteRewardError(f"{self.endpoint}: {why}")

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        call = self._call(self._payload(prompts, completions, kwargs))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(call)
        # Called from inside an event loop (a notebook): the call gets a loop of its own.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, call).result()

    def as_async(self) -> Callable[..., Any]:
        """This reward as an ``async`` function of the same arguments (for TRL's concurrent
        reward functions), with the same ``__name__``."""

        async def reward(
            prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
        ) -> list[float | None]:
            return await self._call(self._payload(prompts, completions, kwargs))

        reward.__name__ = self.__name__
        return reward

    def close(self) -> None:
        """Nothing to release: each call has its own connection (kept for callers that close
        their rewards)."""


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


__all__ = ["RemoteReward", "RemoteRewardError"]
