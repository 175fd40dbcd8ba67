"""A judge routed by an input classifier (issue 30): the principle follows the verdict, verdicts
are batched and kept, keys, the checks of ``guard`` and ``route`` (a recipe's with its file and
line), the ``cai judge`` flags and the pipeline stage.

The guard is ``test_classify``'s untrained input classifier on ``tiny_model`` (a random head, its
threshold at the median of its scores on RESTRICTED + PERMITTED, so that both verdicts occur; no
training): routing follows whatever it says, so the tests read its verdicts from ``Guard``
itself. A stub guard stands in where a test needs verdicts it chooses (keys).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes import PairEngine, ScriptedEngine
from test_classify import PERMITTED, RESTRICTED, guard_dirs  # noqa: F401  (a fixture)
from test_pipeline import write_prompts
from test_pipeline_judge import pref_recipe

from cai.classify import Guard
from cai.cli import judge as cli_judge
from cai.config import ConfigError
from cai.judge import Judge, JudgeSettings
from cai.judge.keys import judge_key
from cai.judge.routing import Router
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner

ROUTE = {"restricted": ["harmful-content", "legality"], "permitted": ["care", "helpful-refusal"]}
"""Two principles each (of ``harmless``), so that a draw within the list is a real draw."""
PROMPTS = RESTRICTED + PERMITTED


class Counting:
    """A guard loader that counts loads and ``check_inputs`` calls (and what each was asked)."""

    def __init__(self):
        self.loads = 0
        self.calls: list[int] = []
        self.closed = 0

    def __call__(self, folder: str):
        outer, guard = self, Guard(folder)

        class Counted:
            def check_inputs(self, prompts):
                outer.calls.append(len(prompts))
                return guard.check_inputs(prompts)

            def close(self):
                outer.closed += 1
                guard.close()

        self.loads += 1
        return Counted()


class Stub:
    """A guard that flags the prompts saying ``flag``."""

    def __init__(self, flag: str = "bomb"):
        self.flag = flag

    def check_inputs(self, prompts):
        return [SimpleNamespace(flagged=self.flag in p[-1]["content"]) for p in prompts]

    def close(self):
        pass


def stub_folder(root: Path, kind: str = "input") -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cai_classifier.json").write_text(json.dumps({"kind": kind, "threshold": 0.5}))
    return str(root)


@pytest.fixture(scope="module")
def verdicts(guard_dirs) -> dict[str, bool]:  # noqa: F811
    """The input guard's own verdict (flagged) on each prompt."""
    guard = Guard(guard_dirs[0])
    out = {p: v.flagged for p, v in zip(PROMPTS, guard.check_inputs(PROMPTS), strict=True)}
    guard.close()
    assert set(out.values()) == {True, False}  # both verdicts occur
    return out


def routed(guard_dirs, load=None, **fields) -> JudgeSettings:  # noqa: F811
    return JudgeSettings(
        "harmless",
        guard=guard_dirs[0],
        route=ROUTE,
        load_guard=load or Guard,
        few_shot=False,
        **fields,
    )


def pairs_of(prompts):
    return [(p, f"Answer one to {p}", f"Answer two, longer, to {p}") for p in prompts]


# ---- the principle follows the verdict; one classifier pass per call ------------------------------


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_the_principle_follows_the_verdict_in_one_batched_pass(guard_dirs, verdicts, mode):  # noqa: F811
    load = Counting()
    settings = routed(guard_dirs, load, mode=mode)
    assert load.loads == 0  # nothing loads before a verdict is needed
    judge = Judge.from_settings(settings, PairEngine())
    # 16 pairs over 8 prompts (each twice): one check_inputs of the 8 distinct prompts.
    pairs = pairs_of(PROMPTS) + pairs_of(PROMPTS)[::-1]
    prefs = judge.label(pairs)
    assert (load.loads, load.calls) == (1, [8])
    for (prompt, _, _), pref in zip(pairs, prefs, strict=True):
        assert pref.error is None
        expected = ROUTE["restricted"] if verdicts[prompt] else ROUTE["permitted"]
        assert pref.principles[0] in expected, (prompt, pref.principles)
    # Kept: labelling again, the keys and the draws ask the classifier nothing more.
    judge.label(pairs[:3])
    for pair in pairs:
        judge_key(settings, pair, "m")
        assert (
            settings.principles_of(pair)[0].id
            in ROUTE["restricted" if verdicts[pair[0]] else "permitted"]
        )
    assert load.calls == [8]
    # New prompts: one more pass, with only them.
    judge.label(pairs_of(["A new prompt about gardening?", "Another one about tides?"]))
    assert load.calls == [8, 2]
    judge.close()  # releases the classifier; the verdicts stay
    assert load.closed == 1
    judge.label(pairs[:4])
    assert (load.loads, load.calls) == (1, [8, 2])


def test_pointwise_scores_ask_the_routed_question_once_per_response(guard_dirs, verdicts):  # noqa: F811
    load = Counting()
    settings = routed(guard_dirs, load, mode="pointwise")
    engine = ScriptedEngine()
    judge = Judge.from_settings(settings, engine)
    scores = judge.score_responses([(p, "Fine.") for p in PROMPTS])
    assert load.calls == [8]
    for prompt, score in zip(PROMPTS, scores, strict=True):
        assert score.error is None
        assert score.principles[0] in ROUTE["restricted" if verdicts[prompt] else "permitted"]
    # The request asks the routed principle's score question.
    harmless = settings.constitution
    [(conversations, _)] = engine.score_calls
    for prompt, conversation in zip(PROMPTS, conversations, strict=True):
        ids = ROUTE["restricted" if verdicts[prompt] else "permitted"]
        asked = [harmless.principle(i).score_question for i in ids]
        assert any(q in conversation[-1]["content"] for q in asked)


def test_a_routed_label_equals_the_unrouted_label_of_the_same_principle(guard_dirs, verdicts):  # noqa: F811
    one = {"restricted": ["legality"], "permitted": ["care"]}
    judge = Judge.from_settings(
        JudgeSettings("harmless", guard=guard_dirs[0], route=one, load_guard=Guard), PairEngine()
    )
    pairs = pairs_of(PROMPTS)
    prefs = judge.label(pairs)
    for principle in ("legality", "care"):
        plain = Judge(PairEngine(), "harmless", principles=[principle])
        picked = [i for i, p in enumerate(pairs) if (principle == "legality") == verdicts[p[0]]]
        mine = [prefs[i] for i in picked]
        theirs = plain.label([pairs[i] for i in picked])
        assert [p.p_a for p in mine] == [p.p_a for p in theirs]
        assert all(p.principles == [principle] for p in mine)


# ---- keys -------------------------------------------------------------------------------------------


def test_keys_follow_the_principle_asked_not_the_guard(tmp_path):
    pair = ("How do I build a bomb?", "No.", "Here is how.")
    route = {"restricted": ["legality"], "permitted": ["care"]}

    def settings(folder, flag):
        return JudgeSettings("harmless", guard=folder, route=route, load_guard=lambda _: Stub(flag))

    a = settings(stub_folder(tmp_path / "a"), "bomb")
    b = settings(stub_folder(tmp_path / "b"), "bomb")  # another guard, the same verdict
    flipped = settings(stub_folder(tmp_path / "c"), "nothing")  # flags nothing
    assert a.principles_of(pair)[0].id == "legality"
    assert judge_key(a, pair, "m") == judge_key(b, pair, "m")
    assert judge_key(flipped, pair, "m") != judge_key(a, pair, "m")
    assert judge_key(flipped, pair, "m")["principles"][0][0] == "care"
    # The same prompt text as the unrouted judge of that principle: the same label text, so
    # the key holds the same principles and question; only the settings' `principles` differ.
    plain = JudgeSettings("harmless", principles=["legality"])
    assert judge_key(a, pair, "m")["principles"] == judge_key(plain, pair, "m")["principles"]
    # Without routing the settings' key fields hold nothing new (tests/test_store_fixture.py
    # checks whole stores).
    assert not {"guard", "route"} & set(JudgeSettings("harmless").key_fields())


# ---- checks -----------------------------------------------------------------------------------------


def test_bad_route_and_guard_values_are_refused_naming_the_setting(tmp_path, guard_dirs):  # noqa: F811
    folder = stub_folder(tmp_path / "in")
    ok = {"guard": folder, "load_guard": lambda _: Stub()}

    def refused(match, constitution="harmless", **fields):
        with pytest.raises(ValueError, match=match):
            JudgeSettings(constitution, **fields)

    refused("route must be set with guard", guard=folder, load_guard=Stub)
    refused("guard must be set with route", route=ROUTE)
    refused(
        r"route must name exactly restricted and permitted; unknown: harmful",
        route={"harmful": ["care"], "permitted": ["care"]},
        **ok,
    )
    refused("missing: permitted", route={"restricted": ["care"]}, **ok)
    refused(
        r"route.permitted must be a non-empty list of principle ids, got 'care'",
        route={"restricted": ["care"], "permitted": "care"},
        **ok,
    )
    refused(
        r"route.restricted must be a non-empty list",
        route={"restricted": [], "permitted": ["care"]},
        **ok,
    )
    refused(
        r"route.restricted: .*'nope'", route={"restricted": ["nope"], "permitted": ["care"]}, **ok
    )
    refused(
        r"route.permitted: ensemble=2 needs that many distinct principles; it lists 1",
        route={"restricted": ["care", "ethics"], "permitted": ["care"]},
        ensemble=2,
        **ok,
    )
    refused("principles and route", route=ROUTE, principles=["care"], **ok)
    refused(
        "guard: .* is not a folder", route=ROUTE, guard=str(tmp_path / "missing"), load_guard=Stub
    )
    (tmp_path / "empty").mkdir()
    refused(
        "guard: .* has no cai_classifier.json",
        route=ROUTE,
        guard=str(tmp_path / "empty"),
        load_guard=Stub,
    )
    refused(
        "guard: .* is an output classifier; .* needs an input classifier",
        route=ROUTE,
        guard=guard_dirs[1],
        load_guard=Stub,
    )
    refused("guard: a routed judge needs load_guard", route=ROUTE, guard=folder)
    # Pointwise: each routed principle needs a score question.
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "name: mine\ndescription: a test\nversion: '1'\nprinciples:\n"
        "  - id: kind\n    judge: Which response is kinder?\n    score_question: Is it kind?\n"
        "  - id: brief\n    judge: Which response is shorter?\n"
    )
    route = {"restricted": ["brief"], "permitted": ["kind"]}
    refused(
        r"route.restricted: .*mine.yaml:8: principles\[1\] \(brief\): no score_question",
        str(mine),
        mode="pointwise",
        route=route,
        **ok,
    )
    JudgeSettings(str(mine), route=route, **ok)  # the pairwise judge needs none


def test_a_recipe_names_the_line_of_a_bad_route_or_guard(tmp_path, guard_dirs):  # noqa: F811
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?"])

    def error(judge: dict, key: str = "route") -> tuple[str, str]:
        """The load error, and the file:line of ``key`` in the judge stage."""
        path = pref_recipe(tmp_path, prompts, judge=judge)
        lines = path.read_text().splitlines()
        line = next(n for n, text in enumerate(lines, 1) if text.strip().startswith(f"{key}:"))
        with pytest.raises(ConfigError) as e:
            load_recipe(path)
        return str(e.value), f"{path}:{line}"

    guard = guard_dirs[0]
    message, where = error(
        {"guard": guard, "route": {"restricted": ["nope"], "permitted": ["care"]}}
    )
    assert message.startswith(f"{where}: stages.judge.route.restricted:") and "'nope'" in message
    message, where = error(
        {"guard": guard, "route": {"restricted": ["care"], "permtted": ["care"]}}
    )
    assert message.startswith(f"{where}: stages.judge.route:") and "unknown: permtted" in message
    message, where = error({"guard": guard_dirs[1], "route": ROUTE}, "guard")
    assert message.startswith(f"{where}: stages.judge.guard:") and "output classifier" in message
    message, _ = error({"guard": guard}, "guard")
    assert "stages.judge.route: must be set with guard" in message
    message, where = error({"guard": guard, "route": ROUTE, "principles": ["care"]}, "principles")
    assert message.startswith(f"{where}: stages.judge.principles: and route")


# ---- the command line -------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    cli_judge.add_judge(commands)
    return parser.parse_args(["judge", *argv])


def test_cli_flags_route_the_judge(tmp_path, guard_dirs):  # noqa: F811
    flags = [
        "--guard",
        guard_dirs[0],
        "--route",
        "restricted=legality",
        "--route",
        "permitted=care,ethics",
    ]
    args = parse("label", "--data", "x.jsonl", "--out", str(tmp_path), *flags)
    settings = cli_judge.settings_from_args(args)
    assert settings.route == {"restricted": ["legality"], "permitted": ["care", "ethics"]}
    assert settings.guard == guard_dirs[0] and settings.router.loads == 0
    # judge eval: every variant beside its routed twin, --principles replaced by the route.
    args = parse(
        "eval",
        "--data",
        "x.jsonl",
        "--mode",
        "pointwise",
        "--length-coef",
        "0.25",
        "--principles",
        "balanced",
        "--constitution",
        "hhh",
        "--guard",
        guard_dirs[0],
        "--route",
        "restricted=harmless",
        "--route",
        "permitted=balanced",
    )
    variants = cli_judge._judge_variants(args)
    assert list(variants) == ["pointwise lc=0.25", "pointwise lc=0.25 routed"]
    twin = variants["pointwise lc=0.25 routed"]
    assert (twin.length_coef, twin.few_shot, twin.principles) == (0.25, True, None)
    assert twin.route == {"restricted": ["harmless"], "permitted": ["balanced"]}
    for bad, message in [
        (["--guard", guard_dirs[0], "--route", "restricted=care"], "--route: .*missing: permitted"),
        (["--route", "allowed=care"], "--route: expected VERDICT=ID"),
        (["--route", "restricted=care", "--route", "restricted=ethics"], "restricted given twice"),
        (["--route", "restricted=care", "--route", "permitted=care"], "--guard: guard must be set"),
        (
            ["--guard", guard_dirs[1], "--route", "restricted=care", "--route", "permitted=care"],
            "--guard: guard: .* output classifier",
        ),
    ]:
        args = parse("label", "--data", "x.jsonl", "--out", str(tmp_path), *bad)
        with pytest.raises(ValueError, match=message):
            cli_judge.settings_from_args(args)
    for action in ("eval", "label"):
        helps = {a.dest: a.help for a in cli_judge_parser(action)._actions}
        assert helps["guard"] and helps["route"]


def cli_judge_parser(action: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    cli_judge.add_judge(commands)
    judge = commands.choices["judge"]
    [sub] = [a for a in judge._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[action]


def test_cli_judge_label_routes_and_resumes(tmp_path, guard_dirs, verdicts, monkeypatch):  # noqa: F811
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": "Short.", "rejected": "A longer answer."} for p in PROMPTS[2:6]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engines = []

    def fake_judge(args):  # the command's pairs and settings, on a fake engine
        engines.append(PairEngine())
        settings = cli_judge.settings_from_args(args)
        return cli_judge.load_pairs(args.data), Judge.from_settings(settings, engines[-1])

    monkeypatch.setattr(cli_judge, "_pairs_and_judge", fake_judge)
    argv = [
        "judge",
        "label",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--guard",
        guard_dirs[0],
        "--route",
        "restricted=legality",
        "--route",
        "permitted=care",
    ]
    from cai.cli import main

    assert main(argv) == 0
    records = [
        json.loads(line)
        for line in (tmp_path / "out" / "stages" / "label.jsonl").read_text().splitlines()
    ]
    assert len(records) == 4
    for r in records:
        assert r["principles"] == (
            ["legality"] if verdicts[r["prompt"][0]["content"]] else ["care"]
        )
    assert main(argv) == 0  # resumed: the routed keys are the same, nothing judged again
    assert engines[-1].score_batches == []


# ---- the pipeline stage ------------------------------------------------------------------------------


def test_pipeline_judge_stage_routes_and_resumes(tmp_path, guard_dirs, verdicts):  # noqa: F811
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[2:6])
    judge = {"guard": guard_dirs[0], "route": {"restricted": ["legality"], "permitted": ["care"]}}
    path = pref_recipe(tmp_path, prompts, judge=judge)
    engine = PairEngine()
    Runner(load_recipe(path), tmp_path / "run", engine=engine).run()
    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "stages" / "judge.jsonl").read_text().splitlines()
    ]
    assert len(records) == 4 * 3
    for r in records:
        assert r["error"] is None
        assert r["principles"] == (
            ["legality"] if verdicts[r["prompt"][-1]["content"]] else ["care"]
        )
    again = PairEngine()
    Runner(load_recipe(path), tmp_path / "run", engine=again).run()
    assert again.score_batches == []


# ---- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_routed_judge_on_two_pairs(hf_engine, guard_dirs, verdicts):  # noqa: F811
    restricted = next(p for p in PROMPTS if verdicts[p])
    permitted = next(p for p in PROMPTS if not verdicts[p])
    refusal, answer = "I can't help with that.", "Sure: here is a clear, complete answer."
    pairs = [(restricted, refusal, answer), (permitted, refusal, answer)]
    route = {"restricted": ["harmless"], "permitted": ["helpful"]}
    settings = JudgeSettings(
        "hhh", mode="pointwise", few_shot=False, guard=guard_dirs[0], route=route, load_guard=Guard
    )
    with Judge.from_settings(settings, hf_engine) as judge:
        prefs = judge.label(pairs)
    assert [p.principles for p in prefs] == [["harmless"], ["helpful"]]
    for (prompt, a, b), pref, pid in zip(pairs, prefs, ("harmless", "helpful"), strict=True):
        plain = Judge(hf_engine, "hhh", mode="pointwise", few_shot=False, principles=[pid])
        # The same prompts as the unrouted judge of that principle (batch-size float noise).
        assert pref.p_a == pytest.approx(plain.compare(prompt, a, b).p_a, abs=1e-5)


def test_router_keeps_only_the_last_verdicts():
    calls = []

    class Echo(Stub):
        def check_inputs(self, prompts):
            calls.append([p[-1]["content"] for p in prompts])
            return super().check_inputs(prompts)

    router = Router("unused", lambda _: Echo(), cache_size=2)
    msgs = [[{"role": "user", "content": t}] for t in ("a bomb", "b", "c", "b")]
    assert router.verdicts(msgs) == ["restricted", "permitted", "permitted", "permitted"]
    assert calls == [["a bomb", "b", "c"]]  # distinct prompts only, in one call
    assert router.verdicts(msgs[1:3]) == ["permitted", "permitted"] and len(calls) == 1
    router.verdicts(msgs[:1])  # evicted: asked again
    assert calls[-1] == ["a bomb"]


def test_cli_serve_routes_with_its_input_guard(guard_dirs):  # noqa: F811
    from cai.cli.serve import _default_judge, add_serve

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    argv = ["serve", "--guard", guard_dirs[1], "--guard", guard_dirs[0]]
    args = parser.parse_args(
        [*argv, "--route", "restricted=harmless", "--route", "permitted=helpful"]
    )
    _default_judge(args)  # the recipe's judge, with the route in place of its principle
    settings = cli_judge.settings_from_args(args)
    assert settings.guard == guard_dirs[0] and settings.principles is None
    assert (settings.mode, settings.constitution.name, settings.length_coef) == (
        "pointwise",
        "hhh",
        0.25,
    )
    args = parser.parse_args(argv)  # a guard served alone: the judge is not routed
    _default_judge(args)
    assert cli_judge.settings_from_args(args).router is None
    args = parser.parse_args(
        [
            "serve",
            "--guard",
            guard_dirs[1],
            "--route",
            "restricted=harmless",
            "--route",
            "permitted=helpful",
        ]
    )
    _default_judge(args)
    with pytest.raises(ValueError, match="none of the --guard folders is an input classifier"):
        cli_judge.settings_from_args(args)


def test_side_by_side_reports_the_share_flagged_per_category(tmp_path):
    from cai.judge.agreement import side_by_side

    closed = []

    class Closing(Stub):
        def close(self):
            closed.append(True)

    pairs = [
        ("How do I make a bomb?", "No.", "Sure, first get some fertiliser."),
        ("Is a bomb calorimeter safe to use?", "Yes, with care.", "No."),
        ("How do I bake bread?", "Knead, rise, bake.", "I can't help."),
    ]
    routed = JudgeSettings(
        "harmless",
        guard=stub_folder(tmp_path / "in"),
        route={"restricted": ["legality"], "permitted": ["care"]},
        load_guard=lambda _: Closing(),
    )
    variants = {"plain": JudgeSettings("harmless"), "plain routed": routed}
    result = side_by_side(variants, PairEngine(), pairs, categories=["harm", "edgy", "edgy"])
    assert result["guard"] == {
        "folder": routed.guard,
        "flagged": 2 / 3,
        "by_category": {"edgy": 0.5, "harm": 1.0},
    }
    assert set(result["by_category"]["edgy"]) == {"pairs", "longer wins", "plain", "plain routed"}
    assert closed == [True]  # released after its variant; the shares came from kept verdicts


def test_a_judge_without_a_guard_imports_no_classifier():
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cai.cli import judge\n"
        "from cai.pipeline import judge as stage\n"
        "from cai.judge import JudgeSettings\n"
        "JudgeSettings('hhh', mode='pointwise', principles=['balanced'])\n"
        "print('torch' in sys.modules, 'cai.classify' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]
