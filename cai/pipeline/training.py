"""The stages ``train_sft``, ``train_reward`` and ``train_dpo``: the built-in trainers on the
run's own exports.

    stages:
      train_sft: {max_steps: 20, batch_size: 4}    # any cai.train.sft.SFTConfig field
      train_reward: {max_steps: 50}                # any cai.train.reward.RewardConfig field
      train_dpo: {loss: soft_dpo, beta: 0.1}       # any cai.train.dpo.DPOConfig field

The pipeline sets ``data``, ``output_dir`` and ``model`` itself: SFT trains the recipe's model on
``<run>/sft`` into ``<run>/models/sft``; the reward model (Bradley-Terry, a scalar head) and DPO
start from the SFT model (or the recipe's model when there is no SFT stage) and train on
``<run>/preferences`` into ``<run>/models/reward`` and ``<run>/models/dpo``. With a ``train_sft``
stage, ``sample`` draws from the SFT model unless ``stages.sample.model`` names another.

Resuming: a finished model folder carries ``cai_pipeline.json`` (the trainer config, a hash of
the data it saw and the starting model's revision); a re-run whose config and data match skips
the training, one that differs trains anew into a clean folder. Paths inside the run directory
are compared relative to it, so a moved or copied run directory is not trained again. A run
killed during training resumes from the newest Trainer checkpoint when ``save_steps`` is set
(checkpoints go to ``<model>/checkpoints``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.keys import MARKER, revision
from cai.pipeline import online
from cai.pipeline.stage import PipelineError, Stage, StageContext, stage_config

if TYPE_CHECKING:
    from cai.records import StageTally
    from cai.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)

TRAINING_STAGES = ("train_sft", "train_reward", "train_dpo", "train_grpo")


def config_class(kind: str) -> type[TrainConfig]:
    """The trainer config dataclass of a stage (imports the trainer: torch, transformers)."""
    if kind == "train_sft":
        from cai.train.sft import SFTConfig

        return SFTConfig
    if kind == "train_dpo":
        from cai.train.dpo import DPOConfig

        return DPOConfig
    if kind == "train_reward":
        from cai.train.reward import RewardConfig

        return RewardConfig
    if kind == "train_grpo":
        from cai.train.grpo import GRPOConfig

        return GRPOConfig
    raise ValueError(f"unknown training stage {kind!r}; known: {', '.join(TRAINING_STAGES)}")


def trainer_config(
    kind: str,
    options: dict,
    *,
    data: str,
    output_dir: str,
    model: str,
    source: str = "<recipe>",
    **more: Any,
) -> TrainConfig:
    """The trainer config of stage ``kind`` from the recipe's ``options`` plus the paths the
    pipeline sets (and ``more`` it sets: an online round's ``ref_model``); a bad option raises
    ConfigError naming the recipe line when ``options`` came from YAML."""
    return stage_config(
        config_class(kind),
        kind,
        options,
        {"data": data, "output_dir": output_dir, "model": model, **more},
        source=source,
        why="data from the run's own export, output in <run>/models/; "
        "the starting model is the recipe's model",
    )


def check_options(kind: str, recipe_data: Any, source: str) -> None:
    """Validate the trainer options of stage ``kind`` with recipe line numbers, before any work
    starts (the options are free-form in the recipe: the trainer's config class needs torch)."""
    options = recipe_data["stages"][kind]
    if isinstance(options, dict):
        trainer_config(kind, options, data="-", output_dir="-", model="-", source=source)


def output_dir(runner: StageContext, kind: str) -> Path:
    """``<run>/models/<name>``; in online round r, DPO's is ``<run>/rounds/<r>/dpo``."""
    r = online.current_round(runner)
    if kind == "train_dpo" and r is not None:
        return online.round_dir(runner, r) / "dpo"
    return runner.run_dir / "models" / kind.removeprefix("train_")


def policy_after_sft(runner: StageContext) -> str:
    """The model that sampling and DPO start from: the SFT output when the recipe trains one."""
    if runner.recipe.stages.train_sft is not None:
        return str(output_dir(runner, "train_sft"))
    return runner.recipe.model


def policy(runner: StageContext, r: int) -> str:
    """The policy after online round ``r`` (round 0: the SFT model, else the recipe's model)."""
    return policy_after_sft(runner) if r == 0 else str(online.round_dir(runner, r) / "dpo")


def start_model(runner: StageContext, kind: str) -> str:
    """The model stage ``kind`` trains from: the recipe's for SFT, the SFT model for the others;
    in online round r, DPO starts from round r-1's policy."""
    if kind == "train_sft":
        return runner.recipe.model
    r = online.current_round(runner)
    if kind == "train_dpo" and r is not None:
        return policy(runner, r - 1)
    return policy_after_sft(runner)


def reference(runner: StageContext, kind: str) -> dict[str, Any]:
    """An online DPO round's ``ref_model``: the SFT model (online.reference: sft) from round 2 on;
    with ``previous`` (and in round 1) the starting model, DPO's default."""
    online_config = runner.recipe.online
    r = online.current_round(runner)
    if kind != "train_dpo" or r is None or r == 1 or online_config.reference == "previous":
        return {}
    from cai.train.dpo import REFERENCE_FREE

    if runner.recipe.stages.train_dpo.get("loss") in REFERENCE_FREE:
        return {}  # no reference at all
    return {"ref_model": policy(runner, 0)}


def data_dir(runner: StageContext, kind: str) -> Path:
    """What stage ``kind`` trains on; in an online run, the round's preferences (the reward
    model: round 1's)."""
    names = {"train_sft": "sft", "train_grpo": "grpo_prompts"}
    if kind not in names and runner.recipe.online is not None:
        return online.preferences_dir(runner, online.current_round(runner) or 1)
    return runner.run_dir / names.get(kind, "preferences")


def _fingerprint(path: Path) -> str:
    """A hash of an export's data.jsonl: what the trainer saw."""
    digest = hashlib.sha256()
    with open(path / "data.jsonl", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def _portable(settings: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """``settings`` with ``run_dir`` in the config's paths replaced by ``<run>``: what a trained
    model's identity is compared and hashed on, so that moving its run changes nothing."""

    def relative(value: Any) -> Any:
        if isinstance(value, str) and (value == run_dir or value.startswith(run_dir + "/")):
            return "<run>" + value[len(run_dir) :]
        return value

    return {**settings, "config": {k: relative(v) for k, v in settings["config"].items()}}


def _trained_as(marker: dict[str, Any]) -> dict[str, Any] | None:
    """The portable settings a marker was written for. Its run directory is where the pipeline
    put the model then: recorded in the marker (``run_dir``), or for markers written before it
    was, the folder above ``models/`` (``<run>/models/<name>``, see :func:`output_dir`)."""
    try:
        trained_in = marker.get("run_dir") or str(
            Path(marker["config"]["output_dir"]).parent.parent
        )
        settings = {k: marker[k] for k in ("config", "data", "model_revision")}
    except (KeyError, TypeError, AttributeError):
        return None  # a marker without them: train anew
    return _portable(settings, trained_in)


def _hash(settings: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def run_train(runner: StageContext, kind: str, tally: StageTally) -> Path:
    """Train stage ``kind`` unless an identical training already finished; returns the model
    folder. Raises PipelineError when the data it needs was not exported."""
    from cai.train import RESULT_FILE

    data, out = data_dir(runner, kind), output_dir(runner, kind)
    if not (data / "data.jsonl").is_file():
        what = {"train_sft": "SFT data", "train_grpo": "prompts"}.get(kind, "preference pairs")
        raise PipelineError(
            f"{kind}: no {what} in {data} to train on (every record of the stage before failed, "
            "or none qualified); see the summary above and the stage records in "
            f"{runner.store.stages_dir}"
        )
    model = start_model(runner, kind)
    config = trainer_config(
        kind,
        getattr(runner.recipe.stages, kind),
        data=str(data),
        output_dir=str(out),
        model=model,
        **reference(runner, kind),
    )
    settings = {"config": asdict(config), "data": _fingerprint(data), "model_revision": None}
    if kind != "train_sft":
        settings["model_revision"] = revision(model)
    wanted = _hash(_portable(settings, str(runner.run_dir)))
    marker = out / MARKER
    if marker.is_file() and (out / RESULT_FILE).is_file():
        if _hash(_trained_as(json.loads(marker.read_text(encoding="utf-8")))) == wanted:
            tally.done_before = 1
            return out
        log.warning(
            "%s: the data or settings changed since %s was trained; training anew", kind, out
        )
        shutil.rmtree(out)
    elif marker.is_file():
        shutil.rmtree(out)  # a marker without a result: an earlier layout; start clean
    runner.release_engines()
    train = _trainer(kind)
    print(f"{kind}: training {model} on {data} → {out}", file=runner.out, flush=True)
    result: TrainResult = train(config)
    # model_id: the folder relative to its run, for record keys (cai.keys.model_key).
    model_id = f"<run>/{out.relative_to(runner.run_dir).as_posix()}"
    marker.write_text(
        json.dumps(
            {"revision": wanted, "model_id": model_id, "run_dir": str(runner.run_dir), **settings},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    tally.records = 1
    tally.requests = result.global_step
    return out


def _trainer(kind: str):
    if kind == "train_sft":
        from cai.train.sft import train_sft

        return train_sft
    if kind == "train_reward":
        from cai.train.reward import train_reward

        return train_reward
    if kind == "train_grpo":
        from cai.train.grpo import train_grpo

        return train_grpo
    from cai.train.dpo import train_dpo

    return train_dpo


def plan(runner: StageContext, kind: str) -> list[str]:
    options = getattr(runner.recipe.stages, kind)
    model = start_model(runner, kind)
    done = (output_dir(runner, kind) / MARKER).is_file()
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    for name, value in reference(runner, kind).items():
        shown += f", {name}={value}"
    return [
        f"  {kind}: {model} on {data_dir(runner, kind)} → {output_dir(runner, kind)} "
        f"({shown}){' (trained; re-checked at run time)' if done else ''}"
        + (" (skipped for a shard)" if runner.shard else "")
    ]


def _stage(kind: str, doc: str, needs: str, needs_message: str) -> Stage:
    def run(runner: StageContext, tally: StageTally) -> None:
        runner.result.models[kind] = run_train(runner, kind, tally)

    return Stage(
        name=kind,
        doc=doc,
        options=dict[str, Any],
        run=run,
        plan=lambda runner: plan(runner, kind),
        needs=(needs,),
        needs_message=needs_message,
        check_options=lambda data, source: check_options(kind, data, source),
        models=lambda runner: {kind.removeprefix("train_"): str(output_dir(runner, kind))},
        in_shard=False,
        ends_with_report=True,
    )


SFT = _stage(
    "train_sft",
    "SFT on the exported revisions → <run>/models/sft: cai.train.sft.SFTConfig fields "
    "(max_steps, batch_size, lora, ...) but data/output_dir/model; {} for the defaults",
    "critique_revise",
    "train_sft trains on the revisions: it needs a critique_revise stage",
)
REWARD = _stage(
    "train_reward",
    "a Bradley-Terry reward model on the judged pairs → <run>/models/reward, from the SFT "
    "model if one is trained: cai.train.reward.RewardConfig fields; {} for the defaults",
    "judge",
    "train_reward trains on judged pairs: it needs a judge stage",
)
DPO = _stage(
    "train_dpo",
    "DPO on the judged pairs → <run>/models/dpo, from the SFT model if one is trained: "
    "cai.train.dpo.DPOConfig fields (loss, beta, max_steps, ...); {} for the defaults",
    "judge",
    "train_dpo trains on judged pairs: it needs a judge stage",
)
