"""Other trainers' hooks: a reward function (``JudgeReward``, ``RemoteReward``, ...) as verl's
batched ``compute_score`` and OpenRLHF's ``reward_func`` (docs/guides/rewards.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

RewardFunction = Callable[..., list[float | None]]


def _floats(rewards: list[float | None]) -> list[float]:
    return [math.nan if r is None else float(r) for r in rewards]


def verl_compute_score(reward: RewardFunction) -> Callable[..., list[float]]:
    """``reward`` as verl's batched ``compute_score`` (``reward_model.reward_manager=batch``):
    ``(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list[float]``.

    verl passes no prompt: each row's ``extra_info`` must carry it under ``"prompt"`` (a string
    or chat messages). ``ground_truths`` are the references (``against="reference"``). An
    unscored pair gives NaN.
    """

    def compute_score(
        data_sources: Sequence[Any],
        solution_strs: Sequence[str],
        ground_truths: Sequence[Any],
        extra_infos: Sequence[dict | None],
        **kwargs: Any,
    ) -> list[float]:
        prompts = []
        for i, info in enumerate(extra_infos):
            if not isinstance(info, dict) or "prompt" not in info:
                raise ValueError(
                    f"row {i}: extra_info must carry the prompt under 'prompt' (put it there when "
                    "preparing the verl dataset)"
                )
            prompts.append(info["prompt"])
        key = getattr(reward, "reference_key", "reference")
        return _floats(reward(prompts, list(solution_strs), **{key: list(ground_truths)}))

    compute_score.__name__ = f"verl_{getattr(reward, '__name__', 'reward')}"
    return compute_score


def openrlhf_reward_func(reward: RewardFunction) -> Callable[..., dict[str, Any]]:
    """``reward`` as OpenRLHF's ``reward_func(queries, prompts, labels, **kwargs)`` (a file given
    to ``--remote_rm_url``), returning ``{"rewards", "scores", "extra_logs"}``.

    OpenRLHF's ``queries`` are prompt + response texts: the response is what follows the prompt.
    ``labels`` (``--label_key``) are the references (``against="reference"``). An unscored pair
    gives NaN.
    """

    def reward_func(
        queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any
    ) -> dict[str, Any]:
        import torch

        responses = []
        for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
            if not query.startswith(prompt):
                raise ValueError(f"query {i} does not start with its prompt")
            responses.append(query[len(prompt) :])
        key = getattr(reward, "reference_key", "reference")
        rewards = torch.tensor(_floats(reward(list(prompts), responses, **{key: list(labels)})))
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    reward_func.__name__ = f"openrlhf_{getattr(reward, '__name__', 'reward')}"
    return reward_func


__all__ = ["RewardFunction", "openrlhf_reward_func", "verl_compute_score"]
