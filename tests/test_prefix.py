"""Prefix reuse: the prefix tree by hand, then reuse on against reuse off on a random tiny model
(every shape of batch) and on the real model (critique requests, a pipeline's records).

Reuse must not change results beyond float rounding: option probabilities within 1e-4 in float32,
greedy and seeded samples equal.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from test_pipeline import records, write_prompts, write_recipe

from cai.engine import Sampling, create_engine
from cai.engine.prefix import prefix_tree, sharing_order
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner, run_config
from cai.resources import resolve

TOLERANCE = 1e-4

# ---- the prefix tree (no model) ----------------------------------------------------------------


def test_prefix_tree_by_hand():
    prompts = [
        [1, 2, 3, 4, 5, 6],  # 0 ┐ share 1..5 (node 2), inside 1..3 (node 0)
        [1, 2, 3, 4, 5, 7],  # 1 ┘
        [1, 2, 3, 9, 9],  # 2: shares 1..3 only
        [8, 8, 8],  # 3 ┐ share 8 8 (node 1)
        [1, 2, 3, 4, 5, 6],  # 4: equal to 0, keeps its last token (6) to run
        [8, 8, 9, 9, 9, 9, 9],  # 5 ┘
        [7],  # 6: alone
    ]
    nodes, deepest = prefix_tree(prompts, min_tokens=2)
    assert [(n.parent, n.start, n.end, sorted(n.rows)) for n in nodes] == [
        (None, 0, 3, [0, 1, 2, 4]),
        (None, 0, 2, [3, 5]),
        (0, 3, 5, [0, 1, 4]),
    ]
    assert deepest == [2, 2, 0, 1, 2, 1, None]
    # Nodes must add min_tokens to their parent: with 3, node 2 (2 more tokens) is not made.
    nodes, deepest = prefix_tree(prompts, min_tokens=3)
    assert [(n.parent, n.start, n.end) for n in nodes] == [(None, 0, 3)]
    assert deepest == [0, 0, 0, None, 0, None, None]
    assert prefix_tree([[5, 6]], 1) == ([], [None])


def test_a_node_that_saves_too_little_leaves_its_tokens_to_its_children():
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 9, 9], [8, 8, 8]]
    prompts += [[1, 2, 3, 4, 5, 6], [8, 8, 9, 9, 9, 9, 9], [7]]

    def tree(min_saved):
        nodes, deepest = prefix_tree(prompts, 2, min_saved)
        return [(n.parent, n.start, n.end, sorted(n.rows)) for n in nodes], deepest

    # Savings: [1,2,3] 3 tokens for 3 more rows = 9; [4,5] under it 2 × 2 = 4; [8,8] 2 × 1 = 2.
    assert tree(3) == (
        [(None, 0, 3, [0, 1, 2, 4]), (0, 3, 5, [0, 1, 4])],
        [1, 1, 0, None, 1, None, None],
    )
    assert tree(5) == ([(None, 0, 3, [0, 1, 2, 4])], [0, 0, 0, None, 0, None, None])
    # [1,2,3] alone saves 9 < 10; the rows that share [1..5] save 2 × 5 = 10 as one node.
    assert tree(10) == ([(None, 0, 5, [0, 1, 4])], [0, 0, None, None, 0, None, None])
    assert tree(11) == ([], [None] * 7)


def test_sharing_order_keeps_sharers_together_longest_first():
    prompts = [[1, 2, 3, 4, 5, 6], [8, 8, 8], [1, 2, 3, 9, 9], [8, 8, 9, 9, 9, 9, 9], [1, 2, 3, 4]]
    # Group [1,2,3]: longest 6; group [8,8]: longest 7 goes first, each longest first inside.
    assert sharing_order(prompts, 2) == [3, 1, 0, 2, 4]
    # Nothing shared: by length, longest first, ties in input order (today's micro-batches).
    assert sharing_order(prompts, 100) == [3, 0, 2, 4, 1]


# ---- reuse on vs off on a random tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines(tiny_model):
    """(reuse on, reuse off) over one model; min_shared_prefix 4 makes deep trees of short
    prompts."""
    on = create_engine(
        "hf", model=tiny_model, dtype="float32", min_shared_prefix=4, min_prefix_saving=0
    )
    off = copy.copy(on)
    off.prefix_reuse = False
    assert on.describe()["prefix_reuse"] and not off.describe()["prefix_reuse"]
    return on, off


SYSTEM = "You judge answers. Read the conversation, then the question, and pick the better answer."


def chat(user: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


BATCHES = {
    # every request shares the system turn; two pairs share more (nested prefixes)
    "shared": [
        chat("Which is kinder, (A) or (B)? (A) yes (B) no"),
        chat("Which is kinder, (A) or (B)? (A) no (B) yes"),
        chat("Which is safer, (A) or (B)? (A) stop (B) go on"),
        chat("Which is safer, (A) or (B)? (A) go on (B) stop"),
        chat("Name a colour."),
    ],
    "none": [
        chat("Hi.", system="Be brief."),
        chat("Hi.", system="Answer."),
        chat("Go on.", system="Hello."),
    ],
    "mixed": [
        chat("Which is kinder, (A) or (B)? (A) yes (B) no"),
        [{"role": "user", "content": "What is 2+2?"}],
        chat("Which is kinder, (A) or (B)? (A) no (B) yes"),
        chat("Be brief.", system="Another system prompt, long enough to be shared."),
        chat("Be long.", system="Another system prompt, long enough to be shared."),
    ],
    "one": [chat("Name a colour.")],
    # the shared text ends inside a token: "unbeliev|able" / "unbeliev|er"
    "mid-token": [chat("That story was unbelievable"), chat("That story was unbeliever")],
}


def fed_tokens(engine, call) -> tuple[object, int]:
    """``call()``'s result and the number of token positions the model ran (pads included)."""
    seen = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    engine.model.forward = counting
    try:
        return call(), sum(seen)
    finally:
        del engine.model.forward


@pytest.mark.parametrize("batch", BATCHES)
def test_reuse_gives_the_same_scores_and_texts(tiny_engines, batch):
    on, off = tiny_engines
    conversations = BATCHES[batch]
    prompts = [on.encoder.encode(on.encoder.render_text(c)) for c in conversations]
    nodes, _ = prefix_tree(prompts, on.min_shared_prefix)
    assert bool(nodes) == (batch in ("shared", "mixed", "mid-token"))
    # multi-token options too: they continue from the reused cache
    for options in (["A", "B"], [" yes", " no thanks"]):
        (got, ran), (want, full) = (
            fed_tokens(e, lambda e=e, o=options: e.score(conversations, o, prefixes="("))
            for e in (on, off)
        )
        for g, w in zip(got, want, strict=True):
            assert g.prompt_tokens == w.prompt_tokens
            assert max(abs(a - b) for a, b in zip(g.probs(), w.probs(), strict=True)) < TOLERANCE
        assert (ran < full) == bool(nodes)  # shared prefixes really ran once
    sampling = [
        Sampling(max_tokens=6),
        Sampling(max_tokens=6, temperature=1.0, n=3, seed=7),  # n rows share the whole prompt
    ] * len(conversations)
    sampling = sampling[: len(conversations)]
    got, want = (
        [[s.text for s in c.samples] for c in e.generate(conversations, sampling)]
        for e in (on, off)
    )
    assert got == want


def test_a_prefix_kept_from_an_earlier_call_is_not_computed_again(tiny_model):
    on = create_engine(
        "hf", model=tiny_model, dtype="float32", min_shared_prefix=4, min_prefix_saving=0
    )
    off = copy.copy(on)
    off.prefix_reuse = False
    batch = BATCHES["shared"]
    want = [s.probs() for s in off.score(batch, ["A", "B"])]
    runs = []
    for conversations in (batch, batch, batch[2:4], batch):
        got, ran = fed_tokens(on, lambda c=conversations: on.score(c, ["A", "B"]))
        runs.append(ran)
        for g, w in zip(got, [want[batch.index(c)] for c in conversations], strict=True):
            assert max(abs(a - b) for a, b in zip(g.probs(), w, strict=True)) < TOLERANCE
    prompts = [on.encoder.encode(on.encoder.render_text(c)) for c in batch]
    [root, *_], _ = prefix_tree(prompts, on.min_shared_prefix)
    assert root.parent is None and root.end > 10
    assert runs[1] == runs[0] - root.end  # the second call continues the kept root
    # A call whose prompts share a longer root continues the kept one (and keeps its own).
    assert len(on.prefix_cache.entries) == 2
    assert runs[3] == runs[1]
    no_cache = copy.copy(on)
    no_cache.prefix_cache = type(on.prefix_cache)(0)
    _, full = fed_tokens(no_cache, lambda: no_cache.score(batch, ["A", "B"]))
    assert full == runs[0]
    # A kept prefix longer than the new root serves sliced: its first root.end positions.
    longer = copy.copy(on)
    longer.prefix_cache = type(on.prefix_cache)(4)
    longer.score(batch[2:4], ["A", "B"])
    [(kept, _)] = longer.prefix_cache.entries.items()
    assert len(kept) > root.end
    got, ran = fed_tokens(longer, lambda: longer.score(batch, ["A", "B"]))
    assert ran == full - root.end
    for g, w in zip(got, want, strict=True):
        assert max(abs(a - b) for a, b in zip(g.probs(), w, strict=True)) < TOLERANCE


def test_a_mid_token_prefix_shares_only_the_tokens_both_encodings_have(tiny_engines):
    on, _ = tiny_engines
    texts = [on.encoder.render_text(c) for c in BATCHES["mid-token"]]
    a, b = (on.encoder.encode(t) for t in texts)
    [node], _ = prefix_tree([a, b], on.min_shared_prefix)
    assert a[: node.end] == b[: node.end] and a[node.end] != b[node.end]
    # The texts share "...unbeliev"; their tokens only "...unbelie" (then "vable" / "ver").
    shared_text = os.path.commonprefix(texts)  # noqa: RUF071 - text, not paths
    shared_tokens = on.tokenizer.decode(a[: node.end])
    assert shared_text.endswith("unbeliev") and shared_tokens.endswith(" unbelie")
    assert shared_text.startswith(shared_tokens)


def test_grouped_attention_gives_transformers_sdpa_numbers(tiny_engines):
    # The tiny model has 2 query heads over 1 key/value head: the CPU engine passes the groups
    # to torch as they are instead of copying keys and values per head, with the same numbers.
    from cai.engine.kv_cache import GROUPED_SDPA

    on, _ = tiny_engines
    assert on.model.config._attn_implementation == GROUPED_SDPA
    conversations = BATCHES["mixed"]
    sampling = Sampling(max_tokens=8, temperature=1.0, seed=3)

    def results():
        scores = [s.logprobs for s in on.score(conversations, ["A", " no thanks"])]
        return scores, [c.text for c in on.generate(conversations, sampling)]

    grouped = results()
    on.model.set_attn_implementation("sdpa")
    try:
        plain = results()
    finally:
        on.model.set_attn_implementation(GROUPED_SDPA)
    assert grouped[1] == plain[1]
    for g, w in zip(grouped[0], plain[0], strict=True):
        assert g == pytest.approx(w, abs=1e-6)


def test_a_reserved_cache_layer_writes_in_place_grows_and_reorders():
    import torch

    from cai.engine.kv_cache import ReservedLayer

    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer = ReservedLayer.of(keys, values, room=2)
    buffer = layer.buffers[0]
    steps = [(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)) for _ in range(3)]
    for i, (k, v) in enumerate(steps[:2]):
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        assert layer.buffers[0] is buffer  # within its room: written in place
        assert layer.get_seq_length() == 6 + i
    layer.reorder_cache(torch.tensor([2, 0]))  # rows that finished leave the cache
    keys, values = keys[[2, 0]], values[[2, 0]]
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    k, v = steps[2][0][[2, 0]], steps[2][1][[2, 0]]
    got_k, got_v = layer.update(k, v)  # out of room: grows
    assert torch.equal(got_k, torch.cat([keys, k], dim=2))
    assert torch.equal(got_v, torch.cat([values, v], dim=2))
    assert layer.buffers[0].shape[2] >= 8


def test_a_shared_prefix_counts_little_in_the_batch_budget(tiny_engines):
    # 24 prompts of 212 tokens that share their first 200 (a judge's exemplars): without reuse
    # they are cut by the token budget; with it, what each row runs itself is 12 tokens, and
    # the shared 200 are kept once per row as keys and values, counted a quarter.
    from cai.engine.hf import _Row

    on, off = tiny_engines
    prompts = [[7] * 200 + [i % 50 + 1] * 12 for i in range(24)]
    rows = [_Row(i, 0, p, Sampling(max_tokens=2), None) for i, p in enumerate(prompts)]
    sizes = {}
    for engine in (on, off):
        engine.max_batch_tokens = 2000
        try:
            batches = list(engine._micro_batches(rows, lambda r: 2))
        finally:
            engine.max_batch_tokens = 16384
        assert sorted(r.request for b in batches for r in b) == list(range(24))
        sizes[engine.prefix_reuse] = [len(b) for b in batches]
    assert sizes[False] == [9, 9, 6]  # 214 tokens × 9 rows fit in 2000
    assert sizes[True] == [24]  # 24 × 14 + 24 × 200 // 4 = 1536


# ---- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_reuse_keeps_a_critique_revise_run_identical(tmp_path, hf_engine):
    """The quickstart's stages (generate, then critique → revision with the constitution's
    few-shot exemplars) write the same records with reuse on and off, and switching it resumes
    the run."""
    prompts = write_prompts(tmp_path / "p.jsonl", ["How do I pick a lock?", "Insult my boss."])
    path = write_recipe(tmp_path, prompts, rounds=1, max_tokens=8)
    off = copy.copy(hf_engine)
    off.prefix_reuse = False
    runs = {}
    for name, engine in (("on", hf_engine), ("off", off)):
        runs[name] = tmp_path / name
        result = Runner(load_recipe(path), runs[name], engine=engine).run()
        assert not result.failed
        manifest = json.loads((runs[name] / "manifest.json").read_text())
        assert manifest["models"]["policy"]["prefix_reuse"] is (name == "on")
    for stage in ("generate", "critique_revise"):
        assert records(runs["on"], stage) == records(runs["off"], stage)
    assert all(r["critique"] and r["revision"] for r in records(runs["on"], "critique_revise"))


def test_prefix_reuse_is_left_out_of_the_run_config():
    quickstart = resolve("pipelines", "quickstart")
    on, off = load_recipe(quickstart), load_recipe(quickstart, ["engine.prefix_reuse=false"])
    assert not off.engine.prefix_reuse and run_config(on) == run_config(off)
    with pytest.raises(ValueError, match="leaves prefix caching to the server"):
        load_recipe(quickstart, ["engine.backend=openai", "engine.prefix_reuse=false"])
    with pytest.raises(ValueError, match=r"set engine\.prefix_reuse instead"):
        load_recipe(quickstart, ["engine.options.enable_prefix_caching=false"])
