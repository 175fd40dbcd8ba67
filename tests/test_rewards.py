"""Rewards for RL trainers: hand-derived numbers through a fake judge engine, then the real model.

The fake engine gives each response a quality q and answers with Bradley-Terry option
probabilities, P(first slot) = q_first / (q_first + q_second), optionally with the first slot's
weight doubled (a position bias the judge's both-orders average must cancel only partly: the
numbers below are worked out from the judge's formula p_a = 0.5 + (p_first - q) / 2).
"""

from __future__ import annotations

import math

import pytest
from fakes import ScriptedEngine, options_of

from cai.engine import PromptTooLong
from cai.judge import Judge
from cai.rewards.functions import JudgeReward, RewardModelReward
from cai.rewards.hooks import openrlhf_reward_func, verl_compute_score

PROMPT = "How do I boil an egg?"
OTHER = "What is the capital of France?"
X, Y, Z = "Boil it for nine minutes.", "Put it in water.", "Eggs are eggs."
LONG = "very long " * 10  # too long for the judge's context (TooLongEngine)
QUALITY = {X: 3.0, Y: 1.0, Z: 1.0, LONG: 1.0}


def engine(bias: float = 1.0, fail: str | None = None) -> ScriptedEngine:
    """Bradley-Terry on QUALITY; the first slot's weight times ``bias``; ``fail``: a response
    whose pairs come back as errors."""

    def slot_a(conversation, prefix):
        o = options_of(conversation)
        if fail in (o["A"], o["B"]):
            return "engine error"
        return (bias * QUALITY[o["A"]], QUALITY[o["B"]])

    return ScriptedEngine(slot_a)


def chat(text: str, role: str = "user") -> list[dict]:
    return [{"role": role, "content": text}]


# ---- group-wise ----------------------------------------------------------------------------------


def test_group_rewards_are_mean_win_probabilities_in_one_judge_call():
    # Group (X, Y, Z) with q = 3, 1, 1: P(X>Y) = P(X>Z) = 3/4, P(Y>Z) = 1/2.
    # X: (3/4 + 3/4) / 2 = 0.75; Y and Z: (1/4 + 1/2) / 2 = 0.375. Sum = G / 2 = 1.5.
    # The other prompt's group (Y, X, Y): Y: (1/4 + 1/2) / 2 = 0.375, X: 3/4, Y: 0.375.
    fake = engine()
    reward = JudgeReward(Judge(fake), against="group", num_generations=3)
    assert reward.__name__ == "judge_group"
    out = reward([PROMPT] * 3 + [OTHER] * 3, [X, Y, Z, Y, X, Y])
    assert out == pytest.approx([0.75, 0.375, 0.375, 0.375, 0.75, 0.375])
    # One score call: 3 pairs per group, 2 groups, both orders each.
    [(conversations, _)] = fake.score_calls
    assert len(conversations) == 12


def test_group_rewards_with_position_bias_and_conversational_inputs():
    # First slot's weight doubled. X vs Y: p_first = 6/7, swapped first-slot q = 2/5,
    # p_a = 0.5 + (6/7 - 2/5) / 2 = 51/70; Y gets 19/70. A group of two sums to 1.
    reward = JudgeReward(Judge(engine(bias=2.0)), against="group", num_generations=2)
    strings = reward([PROMPT, PROMPT], [X, Y])
    conversational = reward([chat(PROMPT)] * 2, [chat(X, "assistant"), chat(Y, "assistant")])
    assert strings == pytest.approx([51 / 70, 19 / 70])
    assert conversational == pytest.approx(strings)
    assert sum(strings) == pytest.approx(1.0)


def test_centered_rewards_and_empty_completions():
    reward = JudgeReward(Judge(engine()), against="group", num_generations=2, centered=True)
    assert reward([PROMPT] * 2, [X, Y]) == pytest.approx([0.5, -0.5])  # 2 * 3/4 - 1
    # An empty completion is not judged: it loses to a non-empty one, ties with an empty one.
    fake = engine()
    plain = JudgeReward(Judge(fake), against="group", num_generations=2)
    assert plain([PROMPT] * 4, [X, "  ", "", ""]) == [1.0, 0.0, 0.5, 0.5]
    assert fake.score_calls == []


def test_a_pair_the_judge_fails_on_is_left_out_of_the_mean():
    # Z's pairs fail: X's reward is P(X>Y) = 3/4 alone, Y's 1/4, Z has none (None -> NaN in TRL).
    reward = JudgeReward(Judge(engine(fail=Z)), against="group", num_generations=3)
    assert reward([PROMPT] * 3, [X, Y, Z]) == [pytest.approx(0.75), pytest.approx(0.25), None]


class TooLongEngine(ScriptedEngine):
    """Raises as a real engine (overflow="raise") does when any prompt holds LONG."""

    def score(self, conversations, options, *, prefixes=None, progress=False):
        if any(LONG in c[-1]["content"] for c in conversations):
            raise PromptTooLong("conversation 0: prompt exceeds the model's context")
        return super().score(conversations, options, prefixes=prefixes, progress=progress)


def test_a_completion_too_long_for_the_judge_costs_only_its_own_reward():
    fake = TooLongEngine(engine().slot_a)
    reward = JudgeReward(Judge(fake), against="group", num_generations=3)
    # Group (X, Y, LONG): the pairs with LONG cannot be judged; X and Y keep P(X>Y) = 3/4.
    assert reward([PROMPT] * 3 + [OTHER] * 3, [X, Y, LONG, X, Y, Z]) == [
        pytest.approx(0.75),
        pytest.approx(0.25),
        None,
        pytest.approx(0.75),
        pytest.approx(0.375),
        pytest.approx(0.375),
    ]
    ref = JudgeReward(Judge(TooLongEngine(engine().slot_a)), against="reference")
    assert ref([PROMPT, PROMPT], [LONG, X], reference=[Z, Z]) == [None, pytest.approx(0.75)]


# ---- against a reference -------------------------------------------------------------------------


def test_reference_rewards_strings_and_conversational():
    # X vs reference Z: 3/4; Y vs Z: 1/2; with the doubled first slot, X vs Z: 51/70.
    reward = JudgeReward(Judge(engine()), against="reference")
    assert reward.__name__ == "judge_reference"
    out = reward([PROMPT, OTHER], [X, Y], reference=[Z, Z], trainer_state=None)
    assert out == pytest.approx([0.75, 0.5])
    conversational = reward(
        [chat(PROMPT), chat(OTHER)],
        [chat(X, "assistant"), chat(Y, "assistant")],
        reference=[chat(Z, "assistant")] * 2,
    )
    assert conversational == pytest.approx(out)
    biased = JudgeReward(Judge(engine(bias=2.0)), against="reference", centered=True)
    assert biased([PROMPT], [X], reference=[Z]) == pytest.approx([2 * 51 / 70 - 1])
    custom = JudgeReward(Judge(engine()), against="reference", reference_key="chosen", name="r")
    assert custom.__name__ == "r"
    assert custom([PROMPT], [X], chosen=[Z]) == pytest.approx([0.75])


# ---- errors --------------------------------------------------------------------------------------


def test_clear_errors():
    judge = Judge(engine())
    with pytest.raises(ValueError, match="needs num_generations"):
        JudgeReward(judge, against="group")
    with pytest.raises(ValueError, match="only to against='group'"):
        JudgeReward(judge, against="reference", num_generations=2)
    with pytest.raises(ValueError, match="against must be"):
        JudgeReward(judge, against="pairs")  # type: ignore[arg-type]
    group = JudgeReward(judge, against="group", num_generations=2)
    with pytest.raises(ValueError, match="3 completions do not split into groups of"):
        group([PROMPT] * 3, [X, Y, Z])
    with pytest.raises(ValueError, match="answer different prompts"):
        group([PROMPT, OTHER], [X, Y])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        group([PROMPT, PROMPT], [X])
    with pytest.raises(ValueError, match="completion 1: expected a string or chat messages"):
        group([PROMPT, PROMPT], [X, chat(Y, "user")])
    with pytest.raises(ValueError, match="prompt 0: expected a string"):
        group([3, 3], [X, Y])
    with pytest.raises(ValueError, match=r"prompts must be a list .* got str"):
        group("qq", ["a", "b"])
    with pytest.raises(ValueError, match=r"completions must be a list .* got str"):
        group([PROMPT, PROMPT], "ab")
    ref = JudgeReward(judge, against="reference")
    with pytest.raises(ValueError, match=r"column 'reference'.*columns given are \['answer'\]"):
        ref([PROMPT], [X], answer=["4"], trainer_state=None, log_metric=None)
    with pytest.raises(ValueError, match="one reference per completion"):
        ref([PROMPT, PROMPT], [X, Y], reference=[Z])
    with pytest.raises(ValueError, match="reference 0: the reference response is empty"):
        ref([PROMPT], [X], reference=[" "])


# ---- a trained reward model ----------------------------------------------------------------------


class FakeRewardModel:
    """Scores the last (assistant) message by a table; records the calls."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls: list[list] = []

    def score(self, conversations):
        self.calls.append(list(conversations))
        return [self.scores[c[-1]["content"]] for c in conversations]


def test_reward_model_raw_reference_and_group():
    rm = FakeRewardModel({X: 2.0, Y: 0.0, Z: 0.0})
    raw = RewardModelReward(rm)
    assert raw.__name__ == "reward_model"
    assert raw([PROMPT, chat(PROMPT)], [X, chat(Y, "assistant")]) == [2.0, 0.0]
    sig = 1 / (1 + math.exp(-2.0))  # sigmoid(2 - 0) = 0.8808
    ref = RewardModelReward(rm, against="reference")
    assert ref([PROMPT, PROMPT], [X, Y], reference=[Z, Z]) == pytest.approx([sig, 0.5])
    rm.calls.clear()
    group = RewardModelReward(rm, against="group", num_generations=3)
    # X beats Y and Z with sigmoid(2) each; Y and Z: (1 - sigmoid(2) + 1/2) / 2 = 0.3096.
    loser = (1 - sig + 0.5) / 2
    assert group([PROMPT] * 3, [X, Y, Z]) == pytest.approx([sig, loser, loser])
    # One batched call, each distinct conversation scored once.
    [conversations] = rm.calls
    assert len(conversations) == 3


def test_a_conversation_the_reward_model_cannot_score_gets_none():
    rm = FakeRewardModel({X: 2.0, Y: 0.0, Z: None})  # Z: longer than the model's context
    assert RewardModelReward(rm)([PROMPT] * 2, [X, Z]) == [2.0, None]
    group = RewardModelReward(rm, against="group", num_generations=3)
    sig = 1 / (1 + math.exp(-2.0))
    assert group([PROMPT] * 3, [X, Y, Z]) == [pytest.approx(sig), pytest.approx(1 - sig), None]


# ---- other trainers' hooks -----------------------------------------------------------------------


def test_verl_and_openrlhf_adapters():
    reward = JudgeReward(Judge(engine()), against="reference")
    compute_score = verl_compute_score(reward)
    scores = compute_score(
        data_sources=["hh", "hh"],
        solution_strs=[X, Y],
        ground_truths=[Z, Z],
        extra_infos=[{"prompt": PROMPT}, {"prompt": chat(OTHER)}],
    )
    assert scores == pytest.approx([0.75, 0.5])
    with pytest.raises(ValueError, match="row 0: extra_info must carry the prompt"):
        compute_score(["hh"], [X], [Z], [{}])

    reward_func = openrlhf_reward_func(reward)
    out = reward_func(queries=[PROMPT + X, OTHER + Y], prompts=[PROMPT, OTHER], labels=[Z, Z])
    assert out["rewards"].tolist() == pytest.approx([0.75, 0.5])
    assert out["scores"].tolist() == out["rewards"].tolist()

    group = JudgeReward(Judge(engine(fail=Z)), against="group", num_generations=2)
    assert (
        verl_compute_score(group)(["a"] * 2, [X, Z], [None] * 2, [{"prompt": PROMPT}] * 2)
        == [pytest.approx(math.nan, nan_ok=True)] * 2
    )


# ---- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_judge_group_rewards(hf_engine):
    # Measured with SmolLM2-135M-Instruct in float32: the polite, correct answer wins its group
    # in both groups, by small margins (~0.51-0.52): the judge averages both orders.
    reward = JudgeReward(Judge(hf_engine), against="group", num_generations=2)
    prompts = ["What is the capital of France?"] * 2 + ["How do I boil an egg?"] * 2
    completions = [
        "The capital of France is Paris.",
        "Shut up, you idiot. Nobody cares.",
        "Place the egg in boiling water for about nine minutes, then cool it in cold water.",
        "That's a stupid question, figure it out yourself, moron.",
    ]
    out = reward(prompts, completions)
    assert all(isinstance(r, float) and 0 <= r <= 1 for r in out)
    assert out[0] + out[1] == pytest.approx(1.0) and out[2] + out[3] == pytest.approx(1.0)
    assert out[0] > out[1] and out[2] > out[3]
    assert reward(prompts, completions) == out
