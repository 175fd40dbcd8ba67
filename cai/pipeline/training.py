"""The stages ``train_sft``, ``train_reward``, ``train_dpo`` and ``train_grpo``: the built-in
trainers on the run's own exports.

    stages:
      train_sft: {max_steps: 20, batch_size: 4}    # any cai.train.sft.SFTConfig field
      train_reward: {max_steps: 50}                # any cai.train.reward.RewardConfig field
      train_dpo: {loss: soft_dpo, beta: 0.1}       # any cai.train.dpo.DPOConfig field
      train_grpo: {max_steps: 50, num_generations: 4, beta: 0.04}   # cai.train.grpo.GRPOConfig

The pipeline sets ``data``, ``output_dir`` and ``model`` itself: SFT trains the recipe's model on
``<run>/sft`` into ``<run>/models/sft``; the reward model (Bradley-Terry, a scalar head) and DPO
start from the SFT model (or the recipe's model when there is no SFT stage) and train on
``<run>/preferences`` into ``<run>/models/reward`` and ``<run>/models/dpo``. With a ``train_sft``
stage, ``sample`` draws from the SFT model unless ``stages.sample.model`` names another.
In an online recipe, ``train_dpo`` runs in every round (from the policy of the round before, into
``<run>/rounds/<r>/dpo``, on the round's pairs) and ``train_reward`` in round 1.

GRPO trains on the recipe's prompts (after ``--limit``, written to ``<run>/grpo_prompts/``), from
the SFT model when the recipe trains one (also its KL reference), with the judge's group-wise
win probability as the reward (``cai.rewards.JudgeReward``: ``judge_model``, ``constitution`` and
``judge_ensemble`` are options of the stage).

Resuming: a finished model folder carries ``cai_pipeline.json`` (the trainer config, a hash of
the data it saw and the starting model's revision); a re-run whose config and data match skips
the training, one that differs trains anew into a clean folder. Paths inside the run directory
are compared relative to it, so a moved or copied run directory is not trained again. A run
killed during training resumes from the newest Trainer checkpoint when ``save_steps`` is set
(checkpoints go to ``<model>/checkpoints``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.jsonl import encode_line, write_atomic
from cai.keys import revision
from cai.layout import DATA_FILE, PIPELINE_MARKER, RUN, TRAIN_RESULT, legacy_run_dir
from cai.pipeline import policy
from cai.pipeline.stage import PipelineError, Stage, StageContext, every_round, stage_config

if TYPE_CHECKING:
    from cai.record_loop import StageTally
    from cai.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainer:
    """What differs between the training stages: the trainer, its data and its model folder."""

    module: str
    """The trainer's module (imported when it trains: torch, transformers)."""
    config: str
    """Its config class."""
    function: str
    """Its training function."""
    model: str
    """The model's folder name (``<run>/models/<model>``; in a round, ``rounds/<r>/<model>``)."""
    data: Callable[[StageContext], Path]
    """What it trains on."""
    what: str
    """The data, in words (the error when there is none)."""
    per_round_folder: bool = False
    """Each round's model in the round's folder (the policy a round trains)."""


TRAINERS = {
    "train_sft": Trainer(
        "cai.train.sft", "SFTConfig", "train_sft", "sft", lambda ctx: ctx.layout.sft, "SFT data"
    ),
    "train_reward": Trainer(
        "cai.train.reward",
        "RewardConfig",
        "train_reward",
        "reward",
        lambda ctx: ctx.layout.preferences(ctx.round),
        "preference pairs",
    ),
    "train_dpo": Trainer(
        "cai.train.dpo",
        "DPOConfig",
        "train_dpo",
        "dpo",
        lambda ctx: ctx.layout.preferences(ctx.round),
        "preference pairs",
        per_round_folder=True,
    ),
    "train_grpo": Trainer(
        "cai.train.grpo",
        "GRPOConfig",
        "train_grpo",
        "grpo",
        lambda ctx: ctx.layout.grpo_prompts,
        "prompts",
    ),
}
"""The training stages by name."""

SET_BY_PIPELINE = ("data", "output_dir", "model")
"""The trainer config fields that the pipeline sets itself: a stage's options must not."""


def config_class(kind: str) -> type[TrainConfig]:
    """The trainer config dataclass of a stage (imports the trainer: torch, transformers)."""
    if kind not in TRAINERS:
        raise ValueError(f"unknown training stage {kind!r}; known: {', '.join(TRAINERS)}")
    trainer = TRAINERS[kind]
    return getattr(importlib.import_module(trainer.module), trainer.config)


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
        trainer_config(kind, options, **dict.fromkeys(SET_BY_PIPELINE, "-"), source=source)


def output_dir(ctx: StageContext, kind: str) -> Path:
    """``<run>/models/<name>``; a model trained per round (DPO's) in ``<run>/rounds/<r>/``."""
    trainer = TRAINERS[kind]
    return ctx.layout.model(trainer.model, ctx.round if trainer.per_round_folder else None)


def start_model(ctx: StageContext, kind: str) -> str:
    """The model stage ``kind`` trains from: the recipe's for SFT, else the policy at the stage
    (the SFT model, else the recipe's; in round r, round r-1's policy)."""
    return ctx.recipe.model if kind == "train_sft" else policy.at_start(ctx)


def reference(ctx: StageContext, kind: str) -> dict[str, Any]:
    """A DPO round's ``ref_model``: the SFT model (online.reference: sft) from round 2 on; with
    ``previous`` (and in round 1) the starting model, DPO's default."""
    r = ctx.round
    if kind != "train_dpo" or r is None or r == 1 or ctx.recipe.online.reference == "previous":
        return {}
    from cai.train.dpo import REFERENCE_FREE

    if ctx.recipe.stages.train_dpo.get("loss") in REFERENCE_FREE:
        return {}  # no reference at all
    return {"ref_model": policy.after_sft(ctx)}


def data_dir(ctx: StageContext, kind: str) -> Path:
    """What stage ``kind`` trains on (a round's: the round's preferences)."""
    return TRAINERS[kind].data(ctx)


def _fingerprint(path: Path) -> str:
    """A hash of an export's data.jsonl: what the trainer saw."""
    digest = hashlib.sha256()
    with open(path / DATA_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def _portable(settings: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """``settings`` with ``run_dir`` in the config's paths replaced by ``<run>``: what a trained
    model's identity is compared and hashed on, so that moving its run changes nothing."""

    def relative(value: Any) -> Any:
        if isinstance(value, str) and (value == run_dir or value.startswith(run_dir + "/")):
            return RUN + value[len(run_dir) :]
        return value

    return {**settings, "config": {k: relative(v) for k, v in settings["config"].items()}}


def _trained_as(marker: dict[str, Any]) -> dict[str, Any] | None:
    """The portable settings a marker was written for. Its run directory is where the pipeline
    put the model then: recorded in the marker (``run_dir``), or for markers written before it
    was, the run that holds the model's folder (``cai.layout.legacy_run_dir``)."""
    try:
        trained_in = marker.get("run_dir") or str(legacy_run_dir(marker["config"]["output_dir"]))
        settings = {k: marker[k] for k in ("config", "data", "model_revision")}
    except (KeyError, TypeError, AttributeError):
        return None  # a marker without them: train anew
    return _portable(settings, trained_in)


def _hash(settings: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def run_train(ctx: StageContext, kind: str, tally: StageTally) -> Path:
    """Train stage ``kind`` unless an identical training already finished; returns the model
    folder. Raises PipelineError when the data it needs was not exported."""
    data, out = data_dir(ctx, kind), output_dir(ctx, kind)
    if not (data / DATA_FILE).is_file():
        raise PipelineError(
            f"{kind}: no {TRAINERS[kind].what} in {data} to train on (every record of the stage before failed, "
            "or none qualified); see the summary above and the stage records in "
            f"{ctx.store.stages_dir}"
        )
    model = start_model(ctx, kind)
    config = trainer_config(
        kind,
        getattr(ctx.recipe.stages, kind),
        data=str(data),
        output_dir=str(out),
        model=model,
        **reference(ctx, kind),
    )
    settings = {"config": asdict(config), "data": _fingerprint(data), "model_revision": None}
    if kind != "train_sft":
        settings["model_revision"] = revision(model)
    wanted = _hash(_portable(settings, str(ctx.run_dir)))
    marker = out / PIPELINE_MARKER
    if marker.is_file() and (out / TRAIN_RESULT).is_file():
        if _hash(_trained_as(json.loads(marker.read_text(encoding="utf-8")))) == wanted:
            tally.done_before = 1
            return out
        log.warning(
            "%s: the data or settings changed since %s was trained; training anew", kind, out
        )
        shutil.rmtree(out)
    elif marker.is_file():
        shutil.rmtree(out)  # a marker without a result: an earlier layout; start clean
    ctx.release_engines()
    train = _trainer(kind)
    print(f"{kind}: training {model} on {data} → {out}", file=ctx.out, flush=True)
    result: TrainResult = train(config)
    # model_id: the folder relative to its run, for record keys (cai.keys.model_key).
    model_id = ctx.layout.relative(out)
    marker.write_text(
        json.dumps(
            {"revision": wanted, "model_id": model_id, "run_dir": str(ctx.run_dir), **settings},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    tally.records = 1
    tally.requests = result.global_step
    return out


def _trainer(kind: str) -> Callable[[TrainConfig], TrainResult]:
    trainer = TRAINERS[kind]
    return getattr(importlib.import_module(trainer.module), trainer.function)


def plan(ctx: StageContext, kind: str) -> list[str]:
    options = getattr(ctx.recipe.stages, kind)
    model = start_model(ctx, kind)
    done = (output_dir(ctx, kind) / PIPELINE_MARKER).is_file()
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    for name, value in reference(ctx, kind).items():
        shown += f", {name}={value}"
    return [
        f"  {kind}: {model} on {data_dir(ctx, kind)} → {output_dir(ctx, kind)} "
        f"({shown}){' (trained; re-checked at run time)' if done else ''}"
        + (" (skipped for a shard)" if ctx.shard else "")
    ]


def write_prompts(ctx: StageContext) -> None:
    """The run's prompts as GRPO's training data (rewritten each run: the training's identity
    hashes the file's content, so the same prompts are the same training)."""
    if not ctx.prompts:
        raise PipelineError("train_grpo: the recipe has no prompts to train on")
    lines = [encode_line({"key": p.key, "prompt": p.messages}) for p in ctx.prompts]
    path = data_dir(ctx, "train_grpo") / DATA_FILE
    write_atomic(path, lambda f: f.writelines(lines))


def _stage(
    kind: str,
    doc: str,
    needs: str | None,
    needs_message: str = "",
    *,
    before: Callable[[StageContext], None] | None = None,
    **declared: Any,
) -> Stage:
    def run(ctx: StageContext, tally: StageTally) -> None:
        if before is not None:
            before(ctx)
        out = run_train(ctx, kind, tally)
        name = TRAINERS[kind].model
        label = "Reward" if name == "reward" else name.upper()
        ctx.result.add(kind, out, f"{label} model: {out}")

    return Stage(
        name=kind,
        doc=doc,
        options=dict[str, Any],
        run=run,
        plan=lambda ctx: plan(ctx, kind),
        needs=(needs,) if needs else (),
        needs_message=needs_message,
        check_options=lambda data, source: check_options(kind, data, source),
        models=lambda ctx: {TRAINERS[kind].model: str(output_dir(ctx, kind))},
        in_shard=False,
        ends_with_report=True,
        **declared,
    )


def _check_dpo(recipe: Any) -> None:
    dpo = recipe.stages.train_dpo
    if recipe.online is not None and isinstance(dpo, dict) and "ref_model" in dpo:
        raise ValueError(
            "stages.train_dpo.ref_model: an online recipe sets the reference with "
            "online.reference (sft or previous); remove it"
        )


def _check_grpo(recipe: Any) -> None:
    if recipe.online is not None:
        raise ValueError("online: train_grpo does not run in rounds; use it in a recipe of its own")


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
    per_round=lambda r: r == 1,  # on round 1's pairs; it labels the rounds after
)
DPO = _stage(
    "train_dpo",
    "DPO on the judged pairs → <run>/models/dpo, from the SFT model if one is trained: "
    "cai.train.dpo.DPOConfig fields (loss, beta, max_steps, ...); {} for the defaults",
    "judge",
    "train_dpo trains on judged pairs: it needs a judge stage",
    per_round=every_round,
    check_recipe=_check_dpo,
)
GRPO = _stage(
    "train_grpo",
    "GRPO on the recipe's prompts with the judge's group-wise reward → <run>/models/grpo, "
    "from the SFT model if one is trained: cai.train.grpo.GRPOConfig fields (num_generations, "
    "max_new_tokens, beta, lora, judge_model, ...) but data/output_dir/model; {} for the defaults",
    None,
    before=write_prompts,
    check_recipe=_check_grpo,
)
