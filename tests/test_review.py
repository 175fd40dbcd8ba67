"""``cai review``: items and their sampling, the append-only labels file (undo, resume, a SIGKILL
mid-append), the statistics against hand-computed values, the export back into load_pairs and
the judge's agreement code, the Label Studio round trip, bad input, and one browser test of the
page (blind, keyboard, undo, reload, HTML shown as text)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_report import (  # the report's browser rule: CI fails, local skips
    CHROMIUM,
    _chromium_or_skip,
)

from cai.cli import main as cai_main
from cai.jsonl import encode_line
from cai.layout import RunLayout
from cai.pairs import load_pairs
from cai.review.items import ReviewError, load_items, sample
from cai.review.labels import LabelLog, live_labels, read_labels, side_shown, to_shown
from cai.review.labelstudio import import_export, tasks
from cai.review.preferences import export_labels
from cai.review.stats import review_stats

EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

# key: (winner, margin, category, round, response_a, response_b)
JUDGED = {
    "k1": ("A", 0.02, "harm", 1, "a long answer one", "short"),
    "k2": ("A", 0.10, "harm", 1, "short", "a long answer two"),
    "k3": ("B", 0.30, "help", 2, "a long answer three", "short"),
    "k4": ("B", 0.40, "help", 2, "a long answer four", "short"),
    "k5": ("tie", 0.0, "harm", 1, "tie one", "tie two"),
}


def make_run(root: Path, extra: int = 0) -> Path:
    """A run with five judged pairs (one a tie), an error record, and ``extra`` more pairs
    (k06..., margin 0.2, the first holding HTML); the categories live in the sample records."""
    layout = RunLayout(root)
    layout.stages.mkdir(parents=True)
    judged = dict(JUDGED)
    for n in range(extra):
        text = EVIL if n == 0 else f"answer {n}"
        judged[f"k{n + 6:02d}"] = ("A", 0.2, "help", 2, text, f"other {n}")
    samples, records = [], []
    for key, (winner, margin, category, r, a, b) in judged.items():
        samples.append({"key": f"s-{key}", "meta": {"category": category}, "error": None})
        p_a = 0.5 + margin if winner == "A" else 0.5 - margin
        prompt = [{"role": "user", "content": f"Question {key}? {EVIL if key == 'k06' else ''}"}]
        records.append(
            {"key": key, "sample_key": f"s-{key}", "prompt": prompt, "response_a": a}
            | {"response_b": b, "winner": winner, "p_a": p_a, "margin": margin, "round": r}
            | {"principles": ["p"], "error": None}
        )
    records.append({"key": "bad", "prompt": [], "error": "the engine failed"})
    layout.stage("sample").write_bytes(b"".join(encode_line(s) for s in samples))
    layout.stage("judge").write_bytes(b"".join(encode_line(r) for r in records))
    return root


ANSWERS = {
    ("ana", "k1"): "A",
    ("ana", "k2"): "B",
    ("ana", "k3"): "B",
    ("ana", "k4"): "B",
    ("ana", "k5"): "A",
    ("bob", "k1"): "A",
    ("bob", "k2"): "tie",
    ("bob", "k3"): "A",
    ("bob", "k4"): "B",
}


def labelled(run: Path) -> LabelLog:
    log = LabelLog(RunLayout(run).review)
    for (who, key), answer in ANSWERS.items():
        log.answer(who, key, side_shown(key, who), answer)
    return log


def test_items_skip_errors_and_carry_category_round_and_judge(tmp_path):
    items = load_items(make_run(tmp_path))
    assert [i.key for i in items] == ["k1", "k2", "k3", "k4", "k5"]
    assert (items[2].category, items[2].round, items[2].winner) == ("help", 2, "B")


def test_sampling_orders(tmp_path):
    """margin: lowest first (k5 0.0, k1 0.02, ...); stratified alternates the (category,
    round) groups (harm, 1) = k1 k2 k5 and (help, 2) = k3 k4; random is seeded."""
    items = load_items(make_run(tmp_path))
    assert [i.key for i in sample(items, "margin")] == ["k5", "k1", "k2", "k3", "k4"]
    strat = [i.category for i in sample(items, "stratified", seed=3)]
    assert strat == ["harm", "help", "harm", "help", "harm"]
    assert sample(items, "random", seed=1) == sample(items, "random", seed=1)
    assert {i.key for i in sample(items, "random", limit=2)} < {i.key for i in items}
    assert len(sample(items, "random", limit=2)) == 2


def test_labels_append_undo_resume_and_sides(tmp_path):
    log = LabelLog(tmp_path)
    keys = ["k1", "k2", "k3"]
    log.answer("ana", "k1", side_shown("k1", "ana"), "A")
    log.answer("ana", "k2", side_shown("k2", "ana"), "skip")
    assert log.next_index("ana", keys) == 2 and log.next_index("bob", keys) == 0
    assert log.undo("ana")["key"] == "k2"
    assert log.next_index("ana", keys) == 1
    again = LabelLog(tmp_path)  # a restarted server reads the same state
    assert again.next_index("ana", keys) == 1
    assert {k: r["answer"] for k, r in again.live().items()} == {("ana", "k1"): "A"}
    assert [r["answer"] for r in read_labels(again.path)] == ["A", "skip", "undo"]
    assert again.undo("bob") is None
    sides = {side_shown(f"k{n}", "ana") for n in range(20)}
    assert sides == {"AB", "BA"} and side_shown("k1", "ana") == side_shown("k1", "ana")
    with pytest.raises(ValueError):
        log.answer("ana", "k3", "AB", "maybe")


def test_a_torn_last_line_is_ignored_then_cut(tmp_path):
    log = LabelLog(tmp_path)
    log.answer("ana", "k1", "AB", "A")
    with log.path.open("ab") as f:
        f.write(b'{"annotator": "ana", "key": "k2", "si')
    assert len(read_labels(log.path)) == 1
    log = LabelLog(tmp_path)
    log.answer("ana", "k2", "BA", "B")
    assert [r["key"] for r in read_labels(log.path)] == ["k1", "k2"]


APPENDER = """
import sys
from cai.review.labels import LabelLog
log = LabelLog(sys.argv[1])
n = 0
while True:
    log.answer("ana", f"k{n}", "AB", "A")
    print(n, flush=True)
    n += 1
"""


@pytest.mark.timeout(60)
def test_sigkill_mid_append_keeps_every_acknowledged_answer(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(APPENDER), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    acknowledged = -1
    while acknowledged < 40:
        acknowledged = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    records = read_labels(tmp_path / "labels.jsonl")
    assert [r["key"] for r in records[: acknowledged + 1]] == [
        f"k{n}" for n in range(acknowledged + 1)
    ]
    LabelLog(tmp_path).answer("bob", "k0", "BA", "B")  # appending after the kill still works
    assert read_labels(tmp_path / "labels.jsonl")[-1]["annotator"] == "bob"


def test_two_annotators_merge_and_stats_match_hand_computed_values(tmp_path):
    """Votes on judge-decided pairs (judge tie k5 and bob's tie on k2 out): ana k1 A ✓, k2 B ✗,
    k3 B ✓, k4 B ✓; bob k1 A ✓, k3 A ✗, k4 B ✓: 5 of 7 agree. Wilson 95% of 5/7: centre
    (5/7 + 1.96²/14) / (1 + 1.96²/7) = 0.6384, half-width 0.2794: [0.359, 0.918].
    Kappa: judge A 3, B 4; people A 3, B 4; p_o = 5/7, p_e = (9 + 16)/49 = 25/49,
    kappa = (35/49 - 25/49) / (24/49) = 5/12.
    Per category: harm (k1 ana ✓, k2 ana ✗, k1 bob ✓) 2/3; help (k3 ✓ ✗, k4 ✓ ✓) 3/4.
    Margins: [0, 0.05) k1 2/2; [0.05, 0.15) k2 0/1; [0.15, 0.5] k3, k4 3/4.
    Longer response (A longer in k1, k3, k4; B in k2): the judge picked it in ana k1, bob k1:
    2/7; people in ana k1, ana k2, bob k1, bob k3: 4/7.
    ana / bob on pairs both decided: k1 A A, k3 B A, k4 B B: 2/3; ana A 1 B 2, bob A 2 B 1,
    p_e = (2 + 2)/9 = 4/9, kappa = (6/9 - 4/9)/(5/9) = 2/5."""
    run = make_run(tmp_path)
    labelled(run)
    stats = review_stats(load_items(run), read_labels(RunLayout(run).review_labels))
    overall = stats["agreement"]
    assert overall["n"] == 7 and overall["value"] == pytest.approx(5 / 7)
    assert overall["low"] == pytest.approx(0.359, abs=1e-3)
    assert overall["high"] == pytest.approx(0.918, abs=1e-3)
    assert overall["kappa"] == pytest.approx(5 / 12)
    assert stats["annotators"] == ["ana", "bob"] and stats["labels"] == 9
    assert stats["answers"] == {"A": 4, "B": 4, "tie": 1, "skip": 0}
    by_cat = {k: (v["value"], v["n"]) for k, v in stats["by_category"].items()}
    assert by_cat == {"harm": (pytest.approx(2 / 3), 3), "help": (0.75, 4)}
    assert {k: v["n"] for k, v in stats["by_round"].items()} == {"1": 3, "2": 4}
    by_margin = {k: (v["value"], v["n"]) for k, v in stats["by_margin"].items()}
    assert by_margin == {"[0, 0.05)": (1.0, 2), "[0.05, 0.15)": (0.0, 1), "[0.15, 0.5]": (0.75, 4)}
    assert stats["length"]["judge_longer"] == pytest.approx(2 / 7)
    assert stats["length"]["people_longer"] == pytest.approx(4 / 7)
    pair = stats["inter_annotator"]["ana / bob"]
    assert (pair["value"], pair["n"]) == (pytest.approx(2 / 3), 3)
    assert pair["kappa"] == pytest.approx(0.4)


def test_export_feeds_load_pairs_and_the_judge_agreement_code(tmp_path):
    """Majorities: k1 A A → A; k2 B (bob's tie is no vote) → B; k3 B A → split, out;
    k4 B B → B; k5 A → A: 4 rows, 1 split."""
    from fakes import ScriptedEngine

    from cai.judge import Judge
    from cai.judge.agreement import agreement

    run = make_run(tmp_path)
    labelled(run)
    out = tmp_path / "human.jsonl"
    result = export_labels(load_items(run), read_labels(RunLayout(run).review_labels), out)
    assert (result.rows, result.split) == (4, 1)
    pairs = load_pairs(out)
    assert [p.key for p in pairs] == ["k1", "k2", "k4", "k5"]
    chosen = {p.key: p.chosen for p in pairs}
    assert chosen == {"k1": JUDGED["k1"][4], "k2": "a long answer two", "k4": "short"} | {
        "k5": "tie one"
    }
    assert pairs[0].meta["annotators"] == ["ana", "bob"] and pairs[0].meta["item_key"] == "k1"
    metrics = agreement(
        Judge(ScriptedEngine(lambda c, p: 0.5)),
        None,
        [(p.prompt, p.chosen, p.rejected) for p in pairs],
    )
    assert metrics["pairs"] == 4 and metrics["accuracy"] == 0.5  # an undecided judge: all ties


def test_label_studio_round_trip(tmp_path):
    run = make_run(tmp_path)
    items = sample(load_items(run), "random", seed=0)
    exported = tasks(items, "ana")
    assert [t["data"]["item_key"] for t in exported] == [i.key for i in items]
    given = {"k1": "A", "k2": "B", "k3": "B", "k4": "A", "k5": "skip"}
    export = []
    for n, task in enumerate(exported):
        data = task["data"]
        answer = given[data["item_key"]]
        left = data["answer1"] == dict((i.key, i.response_a) for i in items)[data["item_key"]]
        assert left == (data["side"] == "AB")
        annotation = {"completed_by": {"email": "eve@x"}, "was_cancelled": answer == "skip"}
        if answer != "skip":
            value = {"selected": to_shown(answer, data["side"])}
            annotation["result"] = [{"from_name": "pw", "to_name": "answer1", "type": "pairwise"}]
            annotation["result"][0]["value"] = value
        export.append({"id": n + 1, "data": data, "annotations": [annotation]})
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(export))
    log = LabelLog(tmp_path / "out")
    assert import_export(path, items, log) == 5
    live = live_labels(read_labels(log.path))
    assert {k: r["answer"] for (who, k), r in live.items()} == given
    assert {who for who, _ in live} == {"labelstudio:eve@x"}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cai_main(["review", "stats", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
    assert cai_main(["review", "stats", str(tmp_path)]) == 1
    assert "no judge records" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    assert cai_main(["review", str(tmp_path), "--data", str(bad), "--port", "1"]) == 1
    assert "rejected" in capsys.readouterr().err
    with pytest.raises(ReviewError, match="margins"):
        sample(load_items(None, data="data/judge_dev.jsonl"), "margin")


def test_stats_and_export_commands(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    labelled(run)
    assert cai_main(["review", "stats", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "human-judge agreement" in lines[1]
    assert json.loads(lines[-1])["agreement"]["n"] == 7
    out = tmp_path / "h.jsonl"
    assert cai_main(["review", "export", str(run), "--out", str(out)]) == 0
    assert len(load_pairs(out)) == 4


@pytest.mark.timeout(60)
def test_the_api_is_blind_and_refuses_malformed_requests(tmp_path):
    from fastapi.testclient import TestClient

    from cai.review.app import ReviewSession, create_review_app

    run = make_run(tmp_path)
    session = ReviewSession(sample(load_items(run), "margin"), LabelLog(tmp_path / "r"), "ana")
    client = TestClient(create_review_app(session))
    state = client.get("/api/state").json()
    assert set(state["item"]) == {"key", "prompt", "left", "right"} and state["item"]["key"] == "k5"
    assert not {"winner", "p_a", "margin", "judge"} & set(json.dumps(state).split('"'))
    assert client.get("/api/reveal/k5").status_code == 409
    for body, status in ((b"{not json", 400), (b"[1]", 400), (b'{"key": "k5"}', 422)):
        response = client.post("/api/answer", content=body)
        assert response.status_code == status and "error" in response.json()
    assert client.post("/api/answer", json={"key": "nope", "choice": "left"}).status_code == 422
    after = client.post("/api/answer", json={"key": "k5", "choice": "left"}).json()
    assert after["done"] == 1 and after["item"]["key"] == "k1"
    assert client.get("/api/reveal/k5").json()["judge"] == "tie"
    keyed = TestClient(create_review_app(ReviewSession(session.items, session.log, "bob", "s3")))
    assert keyed.get("/api/state").status_code == 401
    assert keyed.get("/").status_code == 401 and keyed.get("/?key=s3").status_code == 200
    assert keyed.get("/api/state", headers={"Authorization": "Bearer s3"}).status_code == 200


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def review_server(tmp_path):
    """``cai review`` on a free 127.0.0.1 port over a run of 13 pairs (margin order: k5, k1,
    k2, k06 holding HTML, ...); yields (url, run)."""
    run = make_run(tmp_path / "run", extra=8)
    port = _free_port()
    command = [sys.executable, "-m", "cai.cli", "review", str(run), "--annotator", "ana"]
    proc = subprocess.Popen(
        [*command, "--sample", "margin", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("cai review: http://"), banner + proc.stderr.read()
        yield f"http://127.0.0.1:{port}/", run
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.timeout(120)
def test_the_page_labels_by_keyboard_undoes_and_resumes_blind(review_server):
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    url, run = review_server
    order = [i.key for i in sample(load_items(run), "margin")]
    keys = ["1", "2", "t", "s", "1", "1", "2", "2", "t", "1"]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)

            def settled(done: int) -> None:
                page.wait_for_function(
                    "n => !document.body.classList.contains('busy') && "
                    "document.getElementById('count').textContent.startsWith(n + ' /')",
                    arg=done,
                    timeout=10000,
                )

            settled(0)
            fetched = page.evaluate("fetch('/api/state').then(r => r.json())")
            assert set(fetched["item"]) == {"key", "prompt", "left", "right"}
            text = page.inner_text("body")
            assert "judge" not in page.inner_text("#reveal") and "margin" not in text
            for n, key in enumerate(keys):
                assert page.get_attribute("#conversation", "data-key") == order[n]
                if order[n] == "k06":  # the HTML in it is shown as characters, never run
                    assert "<script>" in page.inner_text("#left") + page.inner_text("#right")
                    assert "<img" in page.inner_text("#conversation")
                    assert page.evaluate("window.__pwned") is None
                    assert page.locator("#pair img, #conversation img").count() == 0
                page.keyboard.press(key)
                settled(n + 1)
            assert "The judge preferred" in page.inner_text("#reveal")
            page.keyboard.press("u")
            settled(9)
            page.reload()
            settled(9)
            assert page.get_attribute("#conversation", "data-key") == order[9]
            assert page.inner_text("#count") == "9 / 13"
        finally:
            browser.close()
    assert not errors
    records = read_labels(RunLayout(run).review_labels)
    assert [r["answer"] for r in records][-1] == "undo" and len(records) == 11
    choice = {"1": "left", "2": "right", "t": "tie", "s": "skip"}
    for record, key in zip(records, keys, strict=False):
        assert record["side"] == side_shown(record["key"], "ana")
        assert to_shown(record["answer"], record["side"]) == choice[key]
    assert len(live_labels(records)) == 9


def test_the_report_has_a_human_audit_section(tmp_path):
    from cai.report.sections import write_report

    run = make_run(tmp_path)
    labelled(run)
    write_report(run)
    text = RunLayout(run).report_md.read_text(encoding="utf-8")
    audit = text.split("## Human audit", 1)[1]
    assert "9 labels" in audit and "| all |" in audit and "ana / bob" in audit
