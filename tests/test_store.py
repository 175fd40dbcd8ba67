"""The run store: stable keys, crash-safe resume (SIGKILL), torn and corrupt lines, locking,
manifests and shard merging."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from cai import stage_files
from cai import store as store_module
from cai.keys import in_shard, parse_shard, record_key, seed_for, shard_of
from cai.merge import merge_runs
from cai.store import RunStore, RunStoreError, config_hash

PARTS = {
    "input_key": "hh-00042",
    "stage": "critique",
    "template": "Critique the response by this principle: {{ principle }}",
    "principle_ids": ["harmless-1", "honest-3"],
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "sampling": {"temperature": 0.7, "max_tokens": 256, "top_p": 1.0},
}


def payload(key: str) -> dict:
    """A record whose content is a pure function of its key, as seeded generation gives."""
    return {"key": key, "text": f"response to {key} " * (1 + seed_for(key) % 7), "n": seed_for(key)}


def keys(count: int) -> list[str]:
    return [record_key(input_key=f"p{i}", stage="gen") for i in range(count)]


def lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def as_set(records: dict[str, dict]) -> set[tuple[str, str]]:
    return {(key, json.dumps(r, sort_keys=True)) for key, r in records.items()}


# ---------------------------------------------------------------------------- keys, seeds, shards


def test_record_key_is_pinned_across_processes_and_versions():
    # Pinned: a change here would silently invalidate every existing run directory.
    assert record_key(**PARTS) == "e3027e7b18b0bdbe3a864d69"
    script = "from cai.keys import record_key; import json, sys; "
    script += "print(record_key(**json.loads(sys.argv[1])))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(PARTS)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.strip() == record_key(**PARTS)


def test_record_key_ignores_order_and_is_sensitive_to_every_part():
    assert record_key(**dict(reversed(PARTS.items()))) == record_key(**PARTS)
    changed = {
        "input_key": "hh-00043",
        "stage": "revise",
        "template": PARTS["template"] + " ",
        "principle_ids": ["harmless-1"],
        "model": "other/model",
        "sampling": {**PARTS["sampling"], "temperature": 0.8},
    }
    seen = {record_key(**PARTS)}
    for name, value in changed.items():
        seen.add(record_key(**{**PARTS, name: value}))
    assert len(seen) == len(changed) + 1


def test_record_key_accepts_dataclasses_sets_and_paths():
    @dataclasses.dataclass
    class Sampling:
        temperature: float
        max_tokens: int

    assert record_key(s=Sampling(0.7, 256)) == record_key(s={"temperature": 0.7, "max_tokens": 256})
    assert record_key(ids={"b", "a"}) == record_key(ids=["a", "b"])
    assert record_key(model=Path("models/x")) == record_key(model="models/x")
    with pytest.raises(TypeError, match="object"):
        record_key(x=object())
    with pytest.raises(ValueError):
        record_key(t=float("nan"))
    with pytest.raises(ValueError):
        record_key()


def test_seed_for_is_deterministic_and_63_bit():
    assert seed_for("k") == seed_for("k") == 6081184576048874971
    assert seed_for("k", base_seed=1) != seed_for("k")
    seeds = {seed_for(k) for k in keys(1000)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)


def test_shards_partition_keys_exactly_and_evenly():
    all_keys = keys(1000)
    n = 4
    owners = Counter()
    for key in all_keys:
        mine = [k for k in range(1, n + 1) if in_shard(key, (k, n))]
        assert mine == [shard_of(key, n)]
        owners[mine[0]] += 1
    assert sorted(owners) == [1, 2, 3, 4]
    assert all(200 <= c <= 300 for c in owners.values()), owners
    assert all(in_shard(key, None) for key in all_keys)
    assert all(shard_of(key, 1) == 1 for key in all_keys)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard(" 4 / 4 ") == (4, 4)
    for text, message in [
        ("0/4", r"1\.\.4"),
        ("5/4", r"1\.\.4"),
        ("1/0", "at least 1"),
        ("1-4", "k/n"),
        ("a/b", "k/n"),
        ("", "k/n"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_shard(text)


# ---------------------------------------------------------------------------- writing and resuming


def test_write_read_and_refuse_done_keys(tmp_path):
    store = RunStore(tmp_path)
    with store.writer("gen") as out:
        assert out.write(payload("a")) is True
        assert out.write(payload("b")) is True
        assert out.write({"key": "a", "text": "other"}) is False  # buffered but already done
        assert "a" in out and len(out) == 2
    assert lines(store.stage_path("gen")) == [payload("a"), payload("b")]
    assert list(store.read_stage("gen")) == ["a", "b"]
    assert store.done_keys("gen") == {"a", "b"}
    with store.writer("gen") as out:
        assert out.write(payload("a")) is False
        assert out.write(payload("c")) is True
    assert list(store.read_stage("gen")) == ["a", "b", "c"]


def test_records_are_compact_utf8_json_lines(tmp_path):
    store = RunStore(tmp_path)
    with store.writer("gen") as out:
        out.write({"key": "k", "text": "héllo ✓"})
        with pytest.raises(ValueError, match="key"):
            out.write({"text": "no key"})
        with pytest.raises(ValueError, match="not plain JSON"):
            out.write({"key": "nan", "logprob": float("-inf")})
    assert store.stage_path("gen").read_bytes() == '{"key":"k","text":"héllo ✓"}\n'.encode()


def test_flush_policy(tmp_path):
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    with store.writer("gen", flush_every=3, flush_seconds=3600) as out:
        out.write(payload("a"))
        out.write(payload("b"))
        assert path.read_bytes() == b""
        out.write(payload("c"))
        assert len(lines(path)) == 3
        out.write(payload("d"))
        out.flush()
        assert len(lines(path)) == 4
        out.write(payload("e"))
    assert len(lines(path)) == 5
    with store.writer("gen", flush_every=1000, flush_seconds=0) as out:
        out.write(payload("f"))
        assert len(lines(path)) == 6


def test_error_records_are_retried_and_replaced(tmp_path):
    store = RunStore(tmp_path)
    with store.writer("gen") as out:
        out.write({"key": "a", "error": "timeout"})
        out.write(payload("b"))
    assert store.done_keys("gen") == {"b"}
    assert store.summary()["gen"]["errors"] == 1
    with store.writer("gen") as out:
        assert "a" not in out
        assert out.write({"key": "a", "error": "timeout again"}) is True
        assert out.write(payload("a")) is True
        assert out.write(payload("a")) is False
    assert store.read_stage("gen") == {"a": payload("a"), "b": payload("b")}
    assert store.summary()["gen"]["errors"] == 0


CHILD = textwrap.dedent(
    """
    import sys, time
    from cai.keys import record_key, seed_for
    from cai.store import RunStore

    run_dir, count = sys.argv[1], int(sys.argv[2])
    with RunStore(run_dir).writer("gen", flush_every=5, flush_seconds=3600) as out:
        for i in range(count):
            key = record_key(input_key=f"p{i}", stage="gen")
            out.write({"key": key, "text": f"response to {key} " * (1 + seed_for(key) % 7),
                       "n": seed_for(key)})
            time.sleep(0.002)
    """
)


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    count = 1500
    all_keys = keys(count)
    killed = RunStore(tmp_path / "killed")
    path = killed.stage_path("gen")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed.run_dir), str(count)])
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and path.read_bytes().count(b"\n") >= 40):
            assert child.poll() is None, "the writer exited before it could be killed"
            assert time.monotonic() < deadline, "the writer wrote nothing"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    survived = killed.done_keys("gen")
    assert 40 <= len(survived) < count, len(survived)

    with killed.writer("gen") as out:
        todo = [key for key in all_keys if key not in out]
        assert set(todo) == set(all_keys) - survived
        for key in all_keys:
            assert out.write(payload(key)) is (key in todo)

    fresh = RunStore(tmp_path / "fresh")
    with fresh.writer("gen") as out:
        for key in all_keys:
            out.write(payload(key))

    on_disk = lines(path)
    assert Counter(r["key"] for r in on_disk) == Counter(all_keys)
    assert as_set(killed.read_stage("gen")) == as_set(fresh.read_stage("gen"))


def test_torn_last_line_is_ignored_then_truncated(tmp_path, caplog):
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    with store.writer("gen") as out:
        out.write(payload("a"))
        out.write(payload("b"))
    good = path.stat().st_size
    with path.open("ab") as f:
        f.write(json.dumps(payload("c")).encode()[:20])

    with caplog.at_level(logging.WARNING):
        assert list(store.read_stage("gen")) == ["a", "b"]
    assert f"byte {good}" in caplog.text and str(path) in caplog.text
    assert path.stat().st_size > good  # reading never modifies the file

    caplog.clear()
    with caplog.at_level(logging.WARNING), store.writer("gen") as out:
        assert "c" not in out
        assert path.stat().st_size == good
        out.write(payload("c"))
        out.write(payload("d"))
    assert "truncated" in caplog.text and f"byte {good}" in caplog.text
    assert [r["key"] for r in lines(path)] == ["a", "b", "c", "d"]


def test_complete_line_without_newline_and_unparsable_last_line_are_torn(tmp_path):
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    with store.writer("gen") as out:
        out.write(payload("a"))
    with path.open("ab") as f:
        f.write(json.dumps(payload("b")).encode())  # whole record, but no newline
    assert list(store.read_stage("gen")) == ["a"]
    with store.writer("gen"):
        pass
    assert [r["key"] for r in lines(path)] == ["a"]

    with path.open("ab") as f:
        f.write(b"\x00\x00\x00\n")  # zero-filled block after a power cut
    assert list(store.read_stage("gen")) == ["a"]
    with store.writer("gen") as out:
        out.write(payload("b"))
    assert [r["key"] for r in lines(path)] == ["a", "b"]


def test_complete_unparsable_last_line_is_corruption_not_a_crash(tmp_path, caplog):
    """A crash can tear only the line being written; one that ends with its newline was written
    whole, so an unparsable one is corruption (an edit, a bad copy), refused as mid-file."""
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    with store.writer("gen") as out:
        out.write(payload("a"))
    with path.open("ab") as f:
        f.write(b'{"key": "b", "text": unquoted}\n')
    before = path.read_bytes()
    pattern = rf"{re.escape(str(path))}:2: invalid record .*ends with its newline.*Delete that line"
    with pytest.raises(RunStoreError, match=pattern):
        store.read_stage("gen")
    with pytest.raises(RunStoreError, match=pattern):
        store.writer("gen")
    assert path.read_bytes() == before  # nothing truncated away


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    with store.writer("gen") as out:
        for key in "abc":
            out.write(payload(key))
    rows = path.read_bytes().splitlines(keepends=True)
    rows[1] = rows[1][:10] + b"\n"
    path.write_bytes(b"".join(rows))
    pattern = rf"{re.escape(str(path))}:2: invalid record .*Delete that line"
    with pytest.raises(RunStoreError, match=pattern):
        store.read_stage("gen")
    with pytest.raises(RunStoreError, match=pattern):
        store.writer("gen")
    path.write_bytes(rows[0] + b'{"no_key": 1}\n' + rows[2])
    with pytest.raises(RunStoreError, match=rf"{re.escape(str(path))}:2: a record must be"):
        store.done_keys("gen")


def test_duplicate_keys_keep_first_and_warn_once(tmp_path, caplog):
    store = RunStore(tmp_path)
    path = store.stage_path("gen")
    path.parent.mkdir(parents=True)
    rows = [{"key": "a", "v": 1}, {"key": "b"}, {"key": "a", "v": 2}, {"key": "a", "v": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        records = store.read_stage("gen")
    assert records == {"a": {"key": "a", "v": 1}, "b": {"key": "b"}}
    assert len(caplog.records) == 1 and "2 duplicate" in caplog.text


def test_second_writer_on_same_file_fails_fast(tmp_path):
    store = RunStore(tmp_path)
    with store.writer("gen", (1, 2)) as out:
        out.write(payload(next(k for k in keys(10) if shard_of(k, 2) == 1)))
        with pytest.raises(RunStoreError, match=r"being written by another process.*--shard"):
            store.writer("gen", (1, 2))
        with store.writer("gen", (2, 2)):  # another shard is another file
            pass
    with store.writer("gen", (1, 2)):  # released on close
        pass


def test_second_writer_in_another_process_fails_fast(tmp_path):
    store = RunStore(tmp_path)
    script = "import sys; from cai.store import RunStore; RunStore(sys.argv[1]).writer('gen')"
    with store.writer("gen"):
        # A writer that waited for the lock would wait forever: the timeout fails the test then.
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0 and "being written by another process" in result.stderr


def test_writer_refuses_keys_of_other_shards(tmp_path):
    key = next(k for k in keys(10) if shard_of(k, 3) == 2)
    with (
        RunStore(tmp_path).writer("gen", (1, 3)) as out,
        pytest.raises(ValueError, match="shard 2/3, not to this writer's 1/3"),
    ):
        out.write(payload(key))


def test_stage_paths(tmp_path):
    store = RunStore(tmp_path)
    assert store.stage_path("judge") == tmp_path / "stages" / "judge.jsonl"
    assert store.stage_path("judge", (2, 4)) == tmp_path / "stages" / "judge.shard-2-of-4.jsonl"
    with pytest.raises(ValueError, match="stage name"):
        store.stage_path("../x")
    with pytest.raises(ValueError, match=r"1\.\.4"):
        store.stage_path("judge", (0, 4))


def test_summary(tmp_path):
    store = RunStore(tmp_path)
    with store.writer("gen") as out:
        out.write({"key": "a", "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        out.write({"key": "b", "usage": {"prompt_tokens": 7, "completion_tokens": 0}})
        out.write({"key": "c", "error": "context too long", "usage": None})
        out.write({"key": "d", "error": None, "skipped": "one response"})
    assert store.summary() == {
        "gen": {
            "records": 4,
            "errors": 1,
            "skipped": 1,
            "prompt_tokens": 17,
            "completion_tokens": 5,
            "total_tokens": 22,
        }
    }


# ---------------------------------------------------------------------------- manifest

CONFIG = {"model": "m", "sampling": {"temperature": 0.7}, "stages": ["gen", "judge"], "limit": 100}


def test_manifest_same_config_resumes(tmp_path):
    store = RunStore(tmp_path)
    assert store.check_manifest(CONFIG) is None
    first = store.write_manifest(
        CONFIG, versions={"cai": "0.1.0"}, seeds={"base": 0}, models={"policy": "m"}
    )
    assert first["config_hash"] == config_hash(CONFIG)
    on_disk = json.loads(store.manifest_path.read_text())
    assert on_disk == first and on_disk["config"] == CONFIG
    assert (
        store.check_manifest(dict(reversed(CONFIG.items())))["config_hash"] == first["config_hash"]
    )
    second = store.write_manifest(CONFIG, versions={}, seeds={}, models={})
    assert second["created"] == first["created"]


def test_manifest_different_config_names_differing_keys(tmp_path):
    store = RunStore(tmp_path)
    store.write_manifest(CONFIG, versions={}, seeds={}, models={})
    changed = {**CONFIG, "sampling": {"temperature": 0.9}, "limit": None, "new": 1}
    del changed["stages"]
    with pytest.raises(RunStoreError) as info:
        store.check_manifest(changed)
    message = str(info.value)
    assert "changed fields: limit, new, sampling.temperature, stages" in message
    assert "  sampling.temperature: 0.7 -> 0.9\n" in message
    assert '  stages: ["gen","judge"] -> (absent)\n' in message
    assert "  new: (absent) -> 1\n" in message
    assert "--run-dir" in message and "--force" in message and "model:" not in message


def test_manifest_refusal_shows_each_changed_field_where_it_differs(tmp_path):
    """Deep changes are named by their field path, and long values are shown where they
    differ, not cut to the same first 80 characters on both sides."""
    store = RunStore(tmp_path)
    long = "You are a careful assistant. " * 6
    config = {
        "model": "m",
        "system_prompt": long + "Be brief.",
        "sources": [{"path": "a.jsonl", "limit": 12}, {"path": "b.jsonl", "limit": 12}],
        "stages": {
            "generate": {"max_tokens": 96, "temperature": 0.7, "top_p": 1.0},
            "critique_revise": {"rounds": 4, "max_tokens": 256, "constitution": "harmless"},
        },
    }
    store.write_manifest(config, versions={}, seeds={}, models={})
    changed = json.loads(json.dumps(config))
    changed["system_prompt"] = long + "Be thorough."
    changed["sources"][1]["limit"] = 3
    changed["sources"].append({"path": "c.jsonl"})
    changed["stages"]["critique_revise"]["rounds"] = 2
    with pytest.raises(RunStoreError) as info:
        store.check_manifest(changed)
    lines = str(info.value).splitlines()
    assert "  stages.critique_revise.rounds: 4 -> 2" in lines
    assert "  sources[1].limit: 12 -> 3" in lines
    assert '  sources[2]: (absent) -> {"path":"c.jsonl"}' in lines
    [prompt] = [line for line in lines if line.startswith("  system_prompt: ")]
    assert "Be brief." in prompt and "Be thorough." in prompt
    assert [line for line in lines if line.startswith("  stages")] == [
        "  stages.critique_revise.rounds: 4 -> 2"
    ]


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    store.write_manifest(CONFIG, versions={}, seeds={}, models={})
    before = store.manifest_path.read_bytes()

    def crash(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.write_manifest({**CONFIG, "model": "x"}, versions={}, seeds={}, models={})
    assert store.manifest_path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_hand_broken_manifest_is_reported(tmp_path):
    store = RunStore(tmp_path)
    store.manifest_path.write_text("{oops")
    with pytest.raises(RunStoreError, match=r"manifest\.json is not valid JSON"):
        store.check_manifest(CONFIG)


# ---------------------------------------------------------------------------- merging


def write_shards(store: RunStore, all_keys: list[str], n: int, only: set[int] | None = None):
    for k in range(1, n + 1):
        if only is None or k in only:
            with store.writer("gen", (k, n)) as out:
                for key in all_keys:
                    if in_shard(key, (k, n)):
                        out.write(payload(key))


def test_merge_shards(tmp_path):
    all_keys = keys(200)
    store = RunStore(tmp_path)
    write_shards(store, all_keys, 3)
    merged = store.merge_shards("gen")
    assert merged == store.stage_path("gen")
    expected = [key for k in (1, 2, 3) for key in all_keys if shard_of(key, 3) == k]
    assert [r["key"] for r in lines(merged)] == expected
    assert store.read_stage("gen") == {key: payload(key) for key in expected}
    assert store.merge_shards("gen") == merged  # idempotent
    assert [r["key"] for r in lines(merged)] == expected
    assert store.summary()["gen"]["records"] == 200
    assert not [p for p in store.stages_dir.iterdir() if p.name.startswith(".")]


def test_merge_shards_missing_overlap_and_mixed(tmp_path):
    all_keys = keys(50)
    store = RunStore(tmp_path)
    with pytest.raises(RunStoreError, match="no shard files"):
        store.merge_shards("gen")
    write_shards(store, all_keys, 4, only={1, 3})
    with pytest.raises(RunStoreError, match=r"shard\(s\) 2/4, 4/4 have no file"):
        store.merge_shards("gen")
    assert not store.stage_path("gen").exists()

    write_shards(store, all_keys, 4, only={2, 4})
    stray = next(k for k in all_keys if shard_of(k, 4) == 1)
    with store.stage_path("gen", (4, 4)).open("a") as f:
        f.write(json.dumps(payload(stray)) + "\n")
    with pytest.raises(RunStoreError, match=rf"key {stray} .* shard 1/4 .* shard 4/4"):
        store.merge_shards("gen")
    assert not store.stage_path("gen").exists()

    store.stage_path("gen", (1, 2)).write_text("")
    with pytest.raises(RunStoreError, match="split 2 and 4 ways"):
        store.merge_shards("gen")


def test_merge_shards_waits_for_writers_and_keeps_unsharded_records(tmp_path):
    store = RunStore(tmp_path)
    write_shards(store, keys(20), 2)
    with (
        store.writer("gen", (2, 2)),
        pytest.raises(RunStoreError, match=r"shard-2-of-2\.jsonl is being written"),
    ):
        store.merge_shards("gen")
    with store.writer("gen") as out:
        out.write(payload("unsharded"))
    with pytest.raises(RunStoreError, match=r"1 done key.* no shard has"):
        store.merge_shards("gen")
    assert list(store.read_stage("gen")) == ["unsharded"]


def test_merge_runs(tmp_path):
    all_keys = keys(120)
    runs = []
    for k in (1, 2, 3):
        run = RunStore(tmp_path / f"machine{k}")
        run.write_manifest(CONFIG, versions={}, seeds={}, models={})
        write_shards(run, all_keys, 3, only={k})
        runs.append(run.run_dir)
    with pytest.raises(RunStoreError, match=r"shard\(s\) 3/3 have no file"):
        merge_runs(runs[:2], tmp_path / "partial")

    out = merge_runs(runs, tmp_path / "merged")
    assert out.read_stage("gen") == {
        key: payload(key) for k in (1, 2, 3) for key in all_keys if shard_of(key, 3) == k
    }
    manifest = out.read_manifest()
    assert manifest["config_hash"] == config_hash(CONFIG)
    assert manifest["merged_from"] == [str(r) for r in runs]
    out.check_manifest(CONFIG)

    with pytest.raises(RunStoreError, match="in two runs"):
        merge_runs([*runs, runs[0]], tmp_path / "again")


def test_merge_runs_rejects_different_configs(tmp_path):
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    a.write_manifest(CONFIG, versions={}, seeds={}, models={})
    b.write_manifest({**CONFIG, "model": "other"}, versions={}, seeds={}, models={})
    with pytest.raises(RunStoreError, match="different configs"):
        merge_runs([a.run_dir, b.run_dir], tmp_path / "out")
    with pytest.raises(RunStoreError, match="does not exist"):
        merge_runs([a.run_dir, tmp_path / "nothing"], tmp_path / "out")


def test_the_record_loop_reads_the_stage_file_once(tmp_path, monkeypatch):
    from cai.record_loop import run_records

    store = RunStore(tmp_path / "run")
    with store.writer("s") as w:
        w.write({"key": "a", "value": 1})
        w.write({"key": "b", "value": None, "error": "boom"})
    scans = []
    real = stage_files.scan_file
    for module in (store_module, stage_files):
        monkeypatch.setattr(
            module, "scan_file", lambda path, **kw: scans.append(path) or real(path, **kw)
        )

    def call(batch, progress):
        return [{"key": k, "value": (1.5, k)} for k in batch]

    records = run_records(store, "s", ["a", "b", "c"], key=lambda k: k, call=call)
    assert scans == [store.stage_path("s")]
    # The records as a reader of the file gets them: the done one kept, the error retried, JSON
    # values (a tuple written is a list read).
    assert records == {
        "a": {"key": "a", "value": 1},
        "b": {"key": "b", "value": [1.5, "b"]},
        "c": {"key": "c", "value": [1.5, "c"]},
    }
    assert records == {k: store.read_stage("s")[k] for k in "abc"}
