"""The run directory's layout: every file and folder a pipeline run writes, named here once.

    <run>/manifest.json                                   resolved recipe, hash, versions, models
    <run>/.lock, <run>/.lock.shard-<k>-of-<n>             one process per run (per shard)
    <run>/stages/<stage>.jsonl                            the run store's stage files
    <run>/stages/<stage>.shard-<k>-of-<n>.jsonl           the same, for ``--shard k/n``
    <run>/sft/, <run>/revision_pairs/, <run>/preferences/ exports (data.jsonl and dataset/)
    <run>/grpo_prompts/                                   GRPO's prompts (data.jsonl)
    <run>/models/<name>/                                  trained models (sft, reward, dpo, grpo)
    <run>/rounds/<r>/preferences/, <run>/rounds/<r>/dpo/  online round r's pairs and policy
    <run>/eval/results.json                               the evaluation
    <run>/report.md, <run>/report.html, <run>/report/     the run report and its plots
    <run>/review/labels.jsonl                             people's labels of judged pairs (cai review)
    <run>/classifier_data/{,heldout_}{inputs,outputs}.jsonl  constitutional classifiers' data

A trained model folder holds ``cai_train.json`` (the trainer's result) and ``cai_pipeline.json``
(what the pipeline trained it from); an export holds ``data.jsonl`` and ``dataset/``. Stages, the
trainers, the evaluation, the report, ``merge`` and the CLI take these paths from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
STAGES = "stages"
DATA_FILE = "data.jsonl"
"""An export's (and a training data folder's) records, one JSON object per line."""
DATASET = "dataset"
"""An export's ``datasets.save_to_disk`` folder."""
TRAIN_RESULT = "cai_train.json"
"""A trained model folder's result file (metrics, curves), written by the trainers."""
CLASSIFIER_FILE = "cai_classifier.json"
"""A trained classifier's folder: its kind (input or output), threshold and held-out metrics,
written by ``cai train classifier`` and read by ``cai.classify.Guard``."""
PIPELINE_MARKER = "cai_pipeline.json"
"""A pipeline-trained model folder's marker: its settings, data hash and identity."""
CHECKPOINTS = "checkpoints"
"""A model folder's Trainer checkpoints (``save_steps``)."""
EVAL_RESULTS = "results.json"
"""The evaluation's results in its output folder (``<run>/eval/``)."""
PLOTS = "report"
"""The report's figures, beside report.md and report.html."""
RUN = "<run>"
"""A run directory in a path that must not depend on where the run is (a trained model's
identity: ``<run>/rounds/1/dpo``)."""
REVIEW = "review"
"""The folder of ``cai review``'s files in a run (or its ``--out``)."""
LABELS_FILE = "labels.jsonl"
"""People's labels in a review folder, appended one answer a line (``cai.review.labels``)."""
CLASSIFIER_DATA = "classifier_data"
"""The folder of the constitutional classifiers' data (``cai.pipeline.classifier_data``)."""
EXPORTS = ("sft", "revision_pairs", "preferences")
"""The export folders of a run, in pipeline order."""

_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SHARD_FILE = re.compile(r"(?P<stage>[A-Za-z0-9_-]+)\.shard-(?P<k>\d+)-of-(?P<n>\d+)\.jsonl")


STAGE_GLOB = "*.jsonl"
"""Every stage file of a run's ``stages/`` (shard files too)."""


def stage_file(stage: str, shard: tuple[int | str, int] | None = None) -> str:
    """``<stage>.jsonl``, or ``<stage>.shard-<k>-of-<n>.jsonl`` for a shard (``k`` may be a
    placeholder, in a message)."""
    if not _STAGE_NAME.fullmatch(stage):
        raise ValueError(f"stage name must match [A-Za-z0-9_-]+, got {stage!r}")
    if shard is None:
        return f"{stage}.jsonl"
    return f"{stage}.shard-{shard[0]}-of-{shard[1]}.jsonl"


def shard_file(name: str) -> tuple[str, tuple[int, int]] | None:
    """(stage, shard) of a shard file's name; None for any other name."""
    match = _SHARD_FILE.fullmatch(name)
    if match is None:
        return None
    return match["stage"], (int(match["k"]), int(match["n"]))


def shard_glob(stage: str = "*") -> str:
    """The glob of a stage's shard files (every stage's with ``*``)."""
    return f"{stage}.shard-*-of-*.jsonl"


def stage_name(path: Path) -> str:
    """A stage file's stage (with its shard part: ``judge.shard-1-of-2``)."""
    return path.name.removesuffix(".jsonl")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def stages(self) -> Path:
        return self.root / STAGES

    def stage(self, stage: str, shard: tuple[int, int] | None = None) -> Path:
        return self.stages / stage_file(stage, shard)

    def lock(self, shard: tuple[int, int] | None = None) -> Path:
        return self.root / (".lock" if shard is None else ".lock.shard-{}-of-{}".format(*shard))

    @staticmethod
    def is_lock(path: Path) -> bool:
        return path.name.startswith(".lock")

    def export(self, name: str) -> Path:
        """An export folder: ``sft``, ``revision_pairs`` (``preferences``: see :meth:`preferences`)."""
        return self.root / name

    @property
    def sft(self) -> Path:
        return self.export("sft")

    @property
    def revision_pairs(self) -> Path:
        return self.export("revision_pairs")

    def preferences(self, round: int | None = None) -> Path:
        """The judged pairs: ``<run>/preferences``; an online round's ``rounds/<r>/preferences``."""
        return self.export("preferences") if round is None else self.round(round) / "preferences"

    @property
    def grpo_prompts(self) -> Path:
        return self.root / "grpo_prompts"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str, round: int | None = None) -> Path:
        """A trained model: ``<run>/models/<name>``; an online round's ``rounds/<r>/<name>``."""
        return self.models / name if round is None else self.round(round) / name

    def round(self, r: int) -> Path:
        return self.root / "rounds" / str(r)

    def round_models(self, name: str) -> dict[int, Path]:
        """Round → the model ``name`` trained in it, of the rounds that have its folder."""
        folders = self.root.glob(f"rounds/*/{name}")
        return {int(p.parent.name): p for p in folders if p.parent.name.isdigit()}

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval / EVAL_RESULTS

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    @property
    def review(self) -> Path:
        return self.root / REVIEW

    @property
    def review_labels(self) -> Path:
        return self.review / LABELS_FILE

    @property
    def classifier_data(self) -> Path:
        return self.root / CLASSIFIER_DATA

    @property
    def classifier_inputs(self) -> Path:
        """The input classifier's training rows (prompt, label)."""
        return self.classifier_data / "inputs.jsonl"

    @property
    def classifier_outputs(self) -> Path:
        """The output classifier's training rows (prompt, response, label)."""
        return self.classifier_data / "outputs.jsonl"

    @property
    def classifier_heldout_inputs(self) -> Path:
        return self.classifier_data / "heldout_inputs.jsonl"

    @property
    def classifier_heldout_outputs(self) -> Path:
        return self.classifier_data / "heldout_outputs.jsonl"

    def relative(self, path: Path) -> str:
        """``<run>/...``: a path inside the run named relative to it (model identities)."""
        return f"{RUN}/{path.relative_to(self.root).as_posix()}"


def legacy_run_dir(model_dir: str | Path) -> Path:
    """The run of a model folder ``<run>/models/<name>``, for markers written before they
    recorded their run directory (only ``models/`` held trained models then)."""
    return Path(model_dir).parent.parent
