"""Record keys are data: run stores written by an earlier cai (tests/fixtures/store_v1 and eval_v1,
made at commit 2419ecd by tests/fixtures/make_store_v1.py) resume under today's code with no new
engine request. A changed key would make the resumed run ask the engine again.

The evaluation's comparisons (eval_compare) have held the judge template's text in their keys
since issue 20, by a migration rather than a re-judge: the shipped template's text adds nothing
to the key (``cai.eval.run.compare_template``), so these stores, judged with it, still resume with
no request, while an edited template re-judges every comparison (and only the comparisons)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fakes import PairEngine

from cai.eval.config import EvalConfig, EvalSet
from cai.eval.run import run_eval
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
