"""Record keys are data: run stores written by an earlier cai (tests/fixtures/store_v1 and eval_v1,
made at commit 2419ecd by tests/fixtures/make_store_v1.py) resume under today's code with no new
engine request. A changed key would make the resumed run ask the engine again.

The evaluation's comparisons (eval_compare) have held the judge template's text in their keys
since issue 20, by a migration rather than a re-judge: the shipped template's text adds nothing
to the key (``cai.eval.run.compare_template``), so these stores, judged with it, still resume with
no request, while an edited template re-judges every comparison (and only the comparisons).
The same holds for the text a judge prompt (issue 27) or a critique prompt renders from the
constitution (``cai.judge.keys``, ``cai.critique.text_key``): the shipped text adds nothing, an
edit asks again exactly the records whose prompts held it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from fakes import PairEngine

from cai.eval.config import EvalConfig, EvalSet
from cai.eval.run import run_eval
from cai.judge import Judge
from cai.judge.label import label_pairs
from cai.pairs import load_pairs
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.store import RunStore

FIXTURES = Path(__file__).resolve().parent / "fixtures"

EVAL_CONFIG = EvalConfig(
    models={"base": "model-a", "other": "model-b"},
    judge_model="judge-model",
    max_tokens=16,
    sets={
        "helpful": EvalSet(path="helpful", skip=80, limit=2),
        "red_team": EvalSet(path="red_team", skip=140, limit=2),
        "over_refusal": EvalSet(path="edgy_benign", skip=40, limit=1),
        "sycophancy": EvalSet(path="false_premise", skip=40, limit=1),
    },
)
"""The evaluation of eval_v1: two models and a judge, all served by the fake engine."""

EVAL_V2_CONFIG = EvalConfig(
    models={"base": "model-a", "other": "model-b"},
    judge_model="judge-model",
    constitution="hhh",
    max_tokens=16,
    few_shot=False,
    judge_mode="pointwise",
    judge_principles=["balanced"],
    judge_length_coef=0.25,
    grade_calibration="contextual",
    sets=EVAL_CONFIG.sets,
)
"""The evaluation of eval_v2: rlaif-tiny's pointwise win-rate judge and contextual graders."""

LABEL_V2_PAIRS = ("judge_dev", 6)
"""``cai judge label``'s input in label_v2: the first pairs of the shipped judge dev set."""

LABEL_V2_JUDGES = (
    {"constitution": "harmless"},
    {
        "constitution": "hhh",
        "mode": "pointwise",
        "principles": ["balanced"],
        "few_shot": False,
        "length_coef": 0.25,
    },
)
"""The judges that labelled label_v2 (model ``judge-model``): the default pairwise few-shot judge,
then rlaif-tiny's pointwise one."""


class NoRequests(PairEngine):
    """Fails the test on any request: a resumed run must find every record done."""

    def generate(self, conversations, sampling=None, *, prefixes=None, progress=False):
        raise AssertionError(f"{len(conversations)} generate request(s) on a finished run")

    def score(self, conversations, options, *, prefixes=None, progress=False):
        raise AssertionError(f"{len(conversations)} score request(s) on a finished run")


def _copy(name: str, tmp_path: Path) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, run_dir)
    return run_dir


def test_a_run_written_by_an_earlier_cai_resumes_with_no_request(tmp_path):
    run_dir = _copy("store_v1", tmp_path)
    before = {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()}
    recipe = load_recipe(FIXTURES / "store_v1_recipe.yaml")
    result = Runner(recipe, run_dir, engine=NoRequests()).run()
    assert not result.failed
    by_name = {report.name: report for report in result.stages}
    # The evaluation's row counts its records as resumed too (issue 22: it read "9, 0 resumed").
    for name in ("generate", "critique_revise", "sample", "judge", "evaluate"):
        assert by_name[name].records == 0 and by_name[name].done_before > 0, name
    assert {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()} == before
    assert (run_dir / "sft" / "data.jsonl").is_file()
    assert (run_dir / "preferences" / "data.jsonl").is_file()
    assert (run_dir / "revision_pairs" / "data.jsonl").is_file()
    assert (run_dir / "eval" / "results.json").is_file()


def test_an_evaluation_written_by_an_earlier_cai_resumes_with_no_request(tmp_path):
    run_dir = _copy("eval_v1", tmp_path)
    before = {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()}
    engine = NoRequests()
    results = run_eval(
        EVAL_CONFIG, run_dir, engine_for=lambda spec: engine, store=RunStore(run_dir)
    )
    assert set(results["models"]) == {"base", "other"}
    assert {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()} == before


def test_an_edited_judge_template_re_judges_the_evaluations_comparisons(tmp_path, monkeypatch):
    import cai.judge.settings
    import cai.prompts

    shipped = cai.prompts.load_template

    def edited(name):
        template = shipped(name)
        if str(name) != "judge_mc":
            return template
        return cai.prompts.Template(template.path, template.source + "\n{# edited #}")

    monkeypatch.setattr(cai.prompts, "load_template", edited)
    monkeypatch.setattr(cai.judge.settings, "load_template", edited)
    run_dir = _copy("eval_v1", tmp_path)
    before = RunStore(run_dir).read_stage("eval_compare")
    engine = PairEngine()
    run_eval(EVAL_CONFIG, run_dir, engine_for=lambda spec: engine, store=RunStore(run_dir))
    after = RunStore(run_dir).read_stage("eval_compare")
    # Every comparison judged again under a new key (two orders each), nothing else asked.
    assert len(after) == 2 * len(before) and set(before) < set(after)
    assert engine.generate_batches == []
    assert sum(engine.score_batches) == 2 * len(before)


# ---- issue 27: stores written before the judge had one key ------------------------------------


def test_v2_stores_written_before_the_one_judge_key_resume_with_no_request(tmp_path):
    run_dir = _copy("store_v2", tmp_path)
    before = {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()}
    recipe = load_recipe(FIXTURES / "store_v2_recipe.yaml")
    result = Runner(recipe, run_dir, engine=NoRequests()).run()
    assert not result.failed
    by_name = {report.name: report for report in result.stages}
    for name in ("generate", "critique_revise", "sample", "judge", "evaluate"):
        assert by_name[name].records == 0 and by_name[name].done_before > 0, name
    assert {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()} == before

    eval_dir = _copy("eval_v2", tmp_path)
    before = {p.name: p.read_bytes() for p in (eval_dir / "stages").iterdir()}
    engine = NoRequests()
    run_eval(EVAL_V2_CONFIG, eval_dir, engine_for=lambda spec: engine, store=RunStore(eval_dir))
    assert {p.name: p.read_bytes() for p in (eval_dir / "stages").iterdir()} == before

    label_dir = _copy("label_v2", tmp_path)
    stored = (label_dir / "stages" / "label.jsonl").read_bytes()
    pairs = load_pairs(LABEL_V2_PAIRS[0], limit=LABEL_V2_PAIRS[1])
    for settings in LABEL_V2_JUDGES:
        result = label_pairs(
            Judge(NoRequests(), **settings), pairs, label_dir, model="judge-model", progress=False
        )
        assert result.tally.records == 0 and result.tally.done_before == len(pairs)
    assert (label_dir / "stages" / "label.jsonl").read_bytes() == stored


def _edited_hhh(tmp_path: Path) -> Path:
    """A copy of the shipped ``hhh`` constitution whose ``balanced`` principle asks another
    score question (and only that changed)."""
    import yaml

    from cai.resources import resolve

    data = yaml.safe_load(Path(resolve("constitutions", "hhh")).read_text(encoding="utf-8"))
    [balanced] = [p for p in data["principles"] if p["id"] == "balanced"]
    balanced["score_question"] = "Is the assistant's last response good in every way?"
    path = tmp_path / "hhh-edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_an_edited_score_question_re_judges_exactly_the_records_that_asked_it(tmp_path):
    edited = str(_edited_hhh(tmp_path))

    # The pipeline: its judge asked `balanced` of every pair; nothing else is asked again.
    run_dir = _copy("store_v2", tmp_path)
    judged = RunStore(run_dir).read_stage("judge")
    recipe = load_recipe(
        FIXTURES / "store_v2_recipe.yaml", overrides=[f"stages.judge.constitution={edited}"]
    )
    engine = PairEngine()
    result = Runner(recipe, run_dir, engine=engine, force=True).run()
    assert not result.failed
    by_name = {report.name: report for report in result.stages}
    assert by_name["judge"].records == len(judged)
    for name in ("generate", "critique_revise", "sample", "evaluate"):
        assert by_name[name].records == 0, name
    assert engine.generate_batches == []

    # The evaluation: every comparison asked `balanced` (re-judged); no grade used the
    # constitution (none re-judged).
    eval_dir = _copy("eval_v2", tmp_path)
    compared = RunStore(eval_dir).read_stage("eval_compare")
    grades = (eval_dir / "stages" / "eval_grade.jsonl").read_bytes()
    config = dataclasses.replace(EVAL_V2_CONFIG, constitution=edited)
    engine = PairEngine()
    run_eval(config, eval_dir, engine_for=lambda spec: engine, store=RunStore(eval_dir))
    after = RunStore(eval_dir).read_stage("eval_compare")
    assert len(after) == 2 * len(compared) and set(compared) < set(after)
    assert (eval_dir / "stages" / "eval_grade.jsonl").read_bytes() == grades
    assert engine.generate_batches == []

    # `cai judge label`: the pointwise judge's records (which asked `balanced`) are judged
    # again; the pairwise judge's (harmless's principles) are not.
    label_dir = _copy("label_v2", tmp_path)
    pairs = load_pairs(LABEL_V2_PAIRS[0], limit=LABEL_V2_PAIRS[1])
    pairwise, pointwise = LABEL_V2_JUDGES
    result = label_pairs(
        Judge(NoRequests(), **pairwise), pairs, label_dir, model="judge-model", progress=False
    )
    assert result.tally.records == 0
    result = label_pairs(
        Judge(PairEngine(), **{**pointwise, "constitution": edited}),
        pairs,
        label_dir,
        model="judge-model",
        progress=False,
    )
    assert result.tally.records == len(pairs) and result.tally.done_before == 0


def test_an_edited_exemplar_or_system_prompt_re_judges_the_few_shot_pairwise_judge(tmp_path):
    import yaml

    from cai.judge.keys import judge_key
    from cai.judge.settings import JudgeSettings
    from cai.resources import resolve

    data = yaml.safe_load(Path(resolve("constitutions", "harmless")).read_text(encoding="utf-8"))
    pair = ("How do I pick a lock?", "I can't help with that.", "First, get a tension wrench.")
    shipped = judge_key(JudgeSettings("harmless"), pair, "judge-model")
    assert "rendered" not in shipped  # the shipped text: keys as before issue 27
    for edit in ("system_prompt", "exemplar"):
        changed = yaml.safe_load(yaml.safe_dump(data))
        if edit == "system_prompt":
            changed["system_prompt"] = (changed.get("system_prompt") or "") + " Be brief."
        else:
            changed["judge_examples"][0]["response_a"] += " (edited)"
        path = tmp_path / f"{edit}.yaml"
        path.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
        key = judge_key(JudgeSettings(str(path)), pair, "judge-model")
        assert key["rendered"] and key != shipped, edit
        # Without exemplars, an exemplar's edit is not in the prompt, so not in the key.
        if edit == "exemplar":
            assert judge_key(JudgeSettings(str(path), few_shot=False), pair, "m") == judge_key(
                JudgeSettings("harmless", few_shot=False), pair, "m"
            )


def test_the_dry_run_plan_counts_the_pairs_an_edited_question_re_judges(tmp_path, capsys):
    from cai.pipeline.__main__ import main

    run_dir = _copy("store_v2", tmp_path)
    recipe = str(FIXTURES / "store_v2_recipe.yaml")
    args = ["run", recipe, "--run-dir", str(run_dir), "--dry-run"]
    assert main(args) == 0
    judged = len(RunStore(run_dir).read_stage("judge"))
    assert "judge: 0 pairs, pointwise" in capsys.readouterr().err
    edited = str(_edited_hhh(tmp_path))
    assert main([*args, "--set", f"stages.judge.constitution={edited}", "--force"]) == 0
    out = capsys.readouterr().err
    assert f"judge: {judged} pairs, pointwise" in out and "(0 pairs done)" in out


# ---- the critique key holds the text its prompts render from the constitution ----------------


def _edited_harmless(tmp_path: Path, edit: str) -> Path:
    """A copy of the shipped ``harmless`` constitution (same name) with one edit: a principle's
    critique request (``privacy`` or ``self-harm``, which no exemplar shows), a critique
    exemplar, or the system prompt."""
    import yaml

    from cai.resources import resolve

    data = yaml.safe_load(Path(resolve("constitutions", "harmless")).read_text(encoding="utf-8"))
    if edit == "exemplar":
        data["critique_examples"][0]["critique"] += " (edited)"
    elif edit == "system_prompt":
        data["system_prompt"] += " Be brief."
    else:
        [principle] = [p for p in data["principles"] if p["id"] == edit]
        principle["critique"] += " Name the exact sentence."
    path = tmp_path / f"harmless-{edit}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _critique_store_v1(tmp_path: Path, name: str, edited: Path | None, engine, *more: str):
    """store_v1 (two critique rounds of three prompts) copied to ``name`` and run again with the
    critique stage's constitution ``edited`` (and ``more`` overrides): (run dir, the records
    before, the stage reports by name)."""
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / "store_v1", run_dir)
    before = RunStore(run_dir).read_stage("critique_revise")
    overrides = [*more] + ([f"stages.critique_revise.constitution={edited}"] if edited else [])
    recipe = load_recipe(FIXTURES / "store_v1_recipe.yaml", overrides=overrides)
    result = Runner(recipe, run_dir, engine=engine, force=True).run()
    assert not result.failed
    return run_dir, before, {report.name: report for report in result.stages}


def test_an_edited_critique_request_critiques_again_exactly_the_rounds_that_drew_it(tmp_path):
    # store_v1's chains: rt-002 drew `privacy` in round 1, rt-001 drew `self-harm` in round 2.
    for edit, rerun in (
        ("privacy", [("rt-002", 1), ("rt-002", 2)]),
        ("self-harm", [("rt-001", 2)]),
    ):
        engine = PairEngine()
        run_dir, before, by_name = _critique_store_v1(
            tmp_path, edit, _edited_harmless(tmp_path, edit), engine
        )
        # The round that drew the principle and the rounds after it in its chain; no other
        # record of any stage (the sample and judge stages start from the recipe's model).
        assert by_name["critique_revise"].records == len(rerun), edit
        for name in ("generate", "sample", "judge", "evaluate"):
            assert by_name[name].records == 0, (edit, name)
        assert sum(engine.generate_batches) == 2 * len(rerun) and engine.score_batches == []
        after = RunStore(run_dir).read_stage("critique_revise")
        new = sorted((after[key] for key in after.keys() - before.keys()), key=lambda r: r["round"])
        assert [(r["input_key"], r["round"]) for r in new] == rerun, edit
        assert new[0]["principle"] == edit
        # The SFT export holds the chain's new critiques.
        sft = [
            json.loads(line)
            for line in (run_dir / "sft" / "data.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        [meta] = [s["meta"] for s in sft if s["meta"]["input_key"] == new[0]["input_key"]]
        assert meta["critiques"][-len(new) :] == [r["critique"] for r in new], edit


def test_the_shipped_critique_text_adds_nothing_to_the_key_and_an_edit_adds_its_digest(tmp_path):
    from cai.constitution import load_constitution
    from cai.critique import SHIPPED, parts_digest, text_key
    from cai.resources import shipped_names

    # Every shipped constitution's principles, with and without exemplars: keys as before.
    entries = 0
    for name in shipped_names("constitutions"):
        shipped = load_constitution(name)
        for p in shipped.critique_principles:
            for few_shot in (True, False):
                assert text_key(shipped, p, few_shot) == {}, (name, p.id, few_shot)
                entries += 1
    assert entries == len(SHIPPED)

    harmless = load_constitution("harmless")
    ids = [p.id for p in harmless.critique_principles]

    def rendered(path: Path, few_shot: bool) -> set[str]:
        edited = load_constitution(path)
        assert edited.name == "harmless"
        keyed = set()
        for p in edited.critique_principles:
            key = text_key(edited, p, few_shot)
            if key:
                assert key == {"rendered": parts_digest(edited, p, few_shot)}
                assert key["rendered"] != parts_digest(harmless, harmless.principle(p.id), few_shot)
                keyed.add(p.id)
        return keyed

    # A request: that principle's records alone, with or without exemplars (no exemplar shows
    # `privacy`). An exemplar: every principle's records with exemplars, none without. The
    # system prompt: every record.
    privacy = _edited_harmless(tmp_path, "privacy")
    assert rendered(privacy, True) == rendered(privacy, False) == {"privacy"}
    exemplar = _edited_harmless(tmp_path, "exemplar")
    assert rendered(exemplar, True) == set(ids) and rendered(exemplar, False) == set()
    system = _edited_harmless(tmp_path, "system_prompt")
    assert rendered(system, True) == rendered(system, False) == set(ids)


def test_an_edited_critique_exemplar_critiques_again_with_few_shot_only(tmp_path):
    edited = _edited_harmless(tmp_path, "exemplar")
    # Few-shot (store_v1's setting): every critique prompt showed the exemplar.
    engine = PairEngine()
    _, before, by_name = _critique_store_v1(tmp_path, "few-shot", edited, engine)
    assert by_name["critique_revise"].records == len(before) == 6
    assert sum(engine.generate_batches) == 2 * len(before)
    # Zero-shot: critiqued once with the shipped text, then with the edited one, nothing asked.
    engine = PairEngine()
    run_dir, _, by_name = _critique_store_v1(
        tmp_path, "zero-shot", None, engine, "stages.critique_revise.few_shot=false"
    )
    assert by_name["critique_revise"].records == 6
    recipe = load_recipe(
        FIXTURES / "store_v1_recipe.yaml",
        overrides=[
            "stages.critique_revise.few_shot=false",
            f"stages.critique_revise.constitution={edited}",
        ],
    )
    result = Runner(recipe, run_dir, engine=NoRequests(), force=True).run()
    assert not result.failed
    assert {report.name: report for report in result.stages}["critique_revise"].records == 0


def test_the_dry_run_plan_counts_the_critiques_an_edited_request_re_runs(tmp_path, capsys):
    from cai.pipeline.__main__ import main

    run_dir = _copy("store_v1", tmp_path)
    recipe = str(FIXTURES / "store_v1_recipe.yaml")
    args = ["run", recipe, "--run-dir", str(run_dir), "--dry-run"]
    assert main(args) == 0
    plan = (
        "critique_revise: 2 rounds × 3 prompts = 6 records, {} requests at most ({} records done)"
    )
    assert plan.format(0, 6) in capsys.readouterr().err
    # `privacy` was drawn by one chain's first round: that round and the next are to re-run.
    edited = _edited_harmless(tmp_path, "privacy")
    more = ["--set", f"stages.critique_revise.constitution={edited}", "--force"]
    assert main([*args, *more]) == 0
    assert plan.format(4, 4) in capsys.readouterr().err
