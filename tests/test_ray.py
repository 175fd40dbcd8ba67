"""The Ray executor (``engine.executor: ray``): engine replicas as Ray actors behind the two verbs.

One local Ray (2 CPUs) serves the whole module. First the settings and the piece logic (a fake
engine in the actors), then the real model through the quickstart recipe (2 replicas of 1 CPU),
compared record by record with one in-process run: same keys and texts on Ray with a replica
killed mid-call, and after a SIGKILLed driver resumes with ``--executor ray``; an address
nobody answers at fails at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import requires_ray

from cai.config import ConfigError
from cai.engine import Completion, Engine, OptionScores, Sample, Sampling
from cai.engine.ray import pieces, replica_gpus
from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner, run_config
from cai.resources import resolve

pytestmark = [requires_ray, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = resolve("pipelines", "quickstart")
TINY = [
    "engine.backend=hf",
    "engine.dtype=float32",
    "stages.generate.max_tokens=16",
    "stages.critique_revise.max_tokens=16",
    "stages.critique_revise.rounds=1",
    "stages.critique_revise.few_shot=false",
]
"""Quickstart at test size (with --limit 3): 3 generations, 3 critiques, 3 revisions."""
LIMIT = 3
RAY = ["engine.executor=ray", "engine.ray.replicas=2", "engine.ray.num_cpus=1"]


def recipe(*extra: str):
    return load_recipe(QUICKSTART, [*TINY, *extra])


def stage_records(run_dir: Path) -> dict[str, list[dict]]:
    """Each stage file's records in file order (duplicates kept, so they show)."""
    out = {}
    for stage in ("generate", "critique_revise"):
        lines = (run_dir / "stages" / f"{stage}.jsonl").read_text().splitlines()
        out[stage] = [json.loads(line) for line in lines]
    return out


def assert_same_records(run_dir: Path, reference: Path) -> None:
    """Every key exactly once, and each record equal to the reference run's."""
    got, want = stage_records(run_dir), stage_records(reference)
    for stage, records in got.items():
        keys = [r["key"] for r in records]
        assert len(keys) == len(set(keys)), f"{stage}: a key written twice"
        by_key = {r["key"]: r for r in want[stage]}
        assert set(keys) == set(by_key), stage
        for record in records:
            assert record == by_key[record["key"]], stage
    assert (run_dir / "sft" / "data.jsonl").read_text() == (
        reference / "sft" / "data.jsonl"
    ).read_text()


# ---- settings (no Ray needed) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.executor=spark", "engine.executor"),
        ("engine.ray.replicas=0", "engine.ray.replicas: must be >= 1"),
        ("engine.ray.num_cpus=0", "engine.ray.num_cpus: must be > 0"),
        ("engine.ray.num_gpus=-1", "engine.ray.num_gpus: must be >= 0"),
        ("engine.ray.address=nohost", "engine.ray.address: must be HOST:PORT"),
        ("engine.ray.address='10.0.0.5:99999'", "HOST:PORT"),
        ("engine.ray.workers=2", "unknown key"),
    ],
)
def test_ray_settings_are_checked_when_the_recipe_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        recipe(override)


def test_gpus_per_replica_are_given_once():
    both = ["engine.backend=vllm", "engine.options.tensor_parallel_size=2"]
    with pytest.raises(ConfigError) as e:
        load_recipe(QUICKSTART, [*both, "engine.ray.num_gpus=1"])
    assert "engine.ray.num_gpus (1)" in str(e.value)
    assert "engine.options.tensor_parallel_size (2)" in str(e.value)
    assert load_recipe(QUICKSTART, [*both, "engine.ray.num_gpus=2"])
    assert replica_gpus("vllm", {"tensor_parallel_size": 4}, None) == 4
    assert replica_gpus("hf", {}, None) is None
    assert replica_gpus("hf", {}, 0.5) == 0.5


def test_the_executor_is_not_part_of_the_run_config(tmp_path, capsys):
    local = recipe()
    ray = recipe(*RAY, "engine.ray.address=auto", "engine.ray.num_gpus=0")
    assert run_config(local) == run_config(ray)
    assert "executor" not in run_config(local)["engine"]
    assert run_config(local) != run_config(recipe("engine.dtype=bfloat16"))
    # A run directory of an in-process run is the same run for --executor ray: no refusal.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Runner(local, run_dir, limit=1)._write_manifest()
    args = ["run", str(QUICKSTART), "--run-dir", str(run_dir), "--dry-run", "--limit", "1"]
    assert main([*args, *(f"--set={s}" for s in TINY), "--executor", "ray"]) == 0
    assert "engines on Ray (RAY_ADDRESS or a local Ray): 1 replica(s)" in capsys.readouterr().err
    changed = [*(f"--set={s}" for s in TINY), "--set=engine.dtype=bfloat16"]
    assert main([*args, *changed]) == 2  # a real change is still refused
    assert "engine.dtype" in capsys.readouterr().err


def test_ray_address_needs_the_ray_executor(tmp_path, capsys):
    args = ["run", "quickstart", "--run-dir", str(tmp_path / "r"), "--dry-run"]
    assert main([*args, "--executor", "local", "--ray-address", "10.0.0.5:6379"]) == 2
    assert "--ray-address needs the ray executor" in capsys.readouterr().err


def test_pieces_cover_the_requests_in_order():
    for count in range(1, 12):
        for parts in range(1, 6):
            cut = pieces(count, parts)
            assert len(cut) == min(count, parts)
            assert [i for part in cut for i in range(count)[part]] == list(range(count))
            sizes = [part.stop - part.start for part in cut]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_a_missing_ray_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ModuleNotFoundError
    args = ["run", str(QUICKSTART), "--run-dir", str(tmp_path / "r"), "--limit", "1"]
    assert main([*args, *(f"--set={s}" for s in TINY), "--executor", "ray"]) == 2
    assert "pip install 'cai[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # not even a directory holding the lock


def test_ray_that_cannot_start_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import ray

    def fails(**kwargs):
        raise RuntimeError("Failed to start the GCS server.\n(a long log follows)")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fails)
    args = ["run", str(QUICKSTART), "--run-dir", str(tmp_path / "r"), "--limit", "1"]
    assert main([*args, *(f"--set={s}" for s in TINY), "--executor", "ray"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: could not start a local Ray (Failed to start the GCS server)")
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()  # a directory the user made stays
    assert main([*args, *(f"--set={s}" for s in TINY), "--executor", "ray"]) == 2
    assert (tmp_path / "r").is_dir()


# ---- replicas with a fake engine --------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs, as CI's machine has. Yields its address."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fakes below
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class SlowEcho(Engine):
    """Echoes each request's content, seed and prefix with its replica's pid and the piece's
    start and end times; each call takes ``delay`` seconds."""

    backend = "echo"
    model_name = "echo"

    def __init__(self, delay: float = 0.5):
        self.delay = delay

    def generate(self, conversations, sampling=Sampling(), *, prefixes=None, progress=False):
        began = time.time()
        time.sleep(self.delay)
        ended = time.time()
        params = sampling if isinstance(sampling, list) else [sampling] * len(conversations)
        texts = prefixes if isinstance(prefixes, list) else [prefixes] * len(conversations)
        out = []
        for conversation, p, prefix in zip(conversations, params, texts, strict=True):
            text = [conversation[-1]["content"], p.seed, prefix, os.getpid(), began, ended]
            out.append(Completion([Sample(json.dumps(text), "stop", 1)], prompt_tokens=1))
        return out

    def score(self, conversations, options, *, prefixes=None, progress=False):
        return [
            OptionScores(list(options), [-float(len(c[-1]["content"]))] * 2, [1, 1])
            for c in conversations
        ]


def no_such_model() -> Engine:
    raise ValueError("unknown model spec 'nope'")


def chats(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"request {i}"}] for i in range(count)]


@pytest.mark.timeout(120)
def test_pieces_run_on_every_replica_at_once_and_come_back_in_order(ray_cluster):
    from cai.engine.ray import RayEngine

    with RayEngine(SlowEcho, replicas=2, num_cpus=1) as engine:
        assert engine.describe() == {
            "backend": "echo",
            "model": "echo",
            "executor": "ray",
            "replicas": 2,
        }
        params = [Sampling(seed=i) for i in range(10)]
        done = engine.generate(chats(10), params, prefixes=[f"p{i}" for i in range(10)])
        rows = [json.loads(c.text) for c in done]
        assert [row[:3] for row in rows] == [[f"request {i}", i, f"p{i}"] for i in range(10)]
        spans = {(pid, start, end) for *_, pid, start, end in rows}
        assert len(spans) == 4  # two pieces per replica
        assert {pid for pid, _, _ in spans} == set(engine.pids())
        # The two replicas worked at the same time, not one after another.
        first = {
            pid: min((s for s in spans if s[0] == pid), key=lambda s: s[1]) for pid, *_ in spans
        }
        (_, start_a, end_a), (_, start_b, end_b) = first.values()
        assert max(start_a, start_b) < min(end_a, end_b)
        scores = engine.score(chats(3), ["A", "B"])
        assert [s.logprobs[0] for s in scores] == [-9.0, -9.0, -9.0]
        assert engine.generate([], Sampling()) == []
        with pytest.raises(ValueError, match="conversation 1"):
            engine.generate([chats(1)[0], []], Sampling())


@pytest.mark.timeout(120)
def test_a_replica_gone_for_good_leaves_its_pieces_to_the_others(ray_cluster):
    from functools import partial

    from cai.engine.ray import RayEngine

    with RayEngine(partial(SlowEcho, 1.0), replicas=2, num_cpus=1, max_restarts=0) as engine:
        victim = engine.pids()[0]
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        done = engine.generate(chats(8), Sampling())
        assert [json.loads(c.text)[0] for c in done] == [f"request {i}" for i in range(8)]
        assert len(engine.actors) == 1


@pytest.mark.timeout(120)
def test_a_replica_that_cannot_build_its_engine_raises_its_error(ray_cluster):
    from cai.engine.ray import RayEngine

    with pytest.raises(ValueError, match="unknown model spec 'nope'"):
        RayEngine(no_such_model, replicas=2, num_cpus=1)
    with pytest.raises(ValueError, match="the Ray cluster has 2"):
        RayEngine(SlowEcho, replicas=3, num_cpus=1)


@pytest.mark.timeout(120)
def test_a_relative_model_folder_reaches_the_replicas(ray_cluster, tiny_model, monkeypatch):
    from cai.engine.ray import replicated

    # The replicas' working directory is not this one (on another node it never is).
    monkeypatch.chdir(Path(tiny_model).parent)
    name = Path(tiny_model).name
    with replicated("hf", name, replicas=1, num_cpus=1, dtype="float32") as engine:
        assert engine.model_name == name and engine.describe()["model"] == name
        [done] = engine.generate(chats(1), Sampling(max_tokens=2))
        assert done.ok


# ---- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The quickstart at test size, in this process: what every Ray run must write."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = Runner(recipe(), run_dir, limit=LIMIT).run()
    assert not result.failed
    return run_dir


def cli(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "cai.pipeline", "run", str(QUICKSTART), "--run-dir"]
    args += [str(run_dir), "--limit", str(LIMIT), *(f"--set={s}" for s in TINY), *extra]
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


class KillsAReplica(Runner):
    """Kills one replica (SIGKILL, by its pid) once the critique call is under way."""

    killed: list[int] | None = None

    def engine_for(self, model: str) -> Engine:
        engine = super().engine_for(model)
        if self.killed is None:
            self.killed = []
            victim = engine.pids()[0]  # asked before any work: the replica is idle
            generated = self.run_dir / "stages" / "generate.jsonl"

            def kill() -> None:
                deadline = time.time() + 240
                while time.time() < deadline and not (
                    generated.exists() and generated.read_text().count("\n") >= LIMIT
                ):
                    time.sleep(0.05)
                critiques = self.run_dir / "stages" / "critique_revise.jsonl"
                assert not critiques.exists() or not critiques.read_text()
                os.kill(victim, signal.SIGKILL)
                self.killed.append(victim)

            threading.Thread(target=kill, daemon=True).start()
        return engine


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_writes_the_records_of_an_in_process_run_with_a_replica_killed_mid_call(
    ray_cluster, reference, tmp_path
):
    """Same keys and texts as in-process; the killed replica restarts and its piece is retried,
    so nothing is lost or written twice. (One run for both checks: the file's time is CI's.)"""
    runner = KillsAReplica(recipe(*RAY), tmp_path / "run", limit=LIMIT)
    result = runner.run()
    assert not result.failed and runner.killed
    assert_same_records(tmp_path / "run", reference)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["models"]["policy"]["executor"] == "ray"
    assert manifest["models"]["policy"]["replicas"] == 2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_driver_resumes_on_ray(ray_cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    flags = ("--set=chunk_size=1", "--executor", "ray", "--ray-address", ray_cluster)
    killed = cli(run_dir, *flags)
    critiques = run_dir / "stages" / "critique_revise.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if critiques.exists() and critiques.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    output, _ = killed.communicate()
    assert critiques.read_text().count("\n") < LIMIT, output  # killed mid-stage
    resumed = cli(run_dir, *flags)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert_same_records(run_dir, reference)


@pytest.mark.timeout(120)
def test_an_unreachable_ray_address_fails_at_once_and_writes_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    began = time.perf_counter()
    run = cli(tmp_path / "run", "--ray-address", f"127.0.0.1:{port}")
    output, _ = run.communicate(timeout=100)
    assert run.returncode == 3, output
    assert time.perf_counter() - began < 60
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in line
    assert "Loading weights" not in output
    assert not (tmp_path / "run").exists()
