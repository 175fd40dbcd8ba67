"""The stages ``class_prompts`` and ``class_completions``: training data for constitutional
classifiers (input and output guards, arXiv 2501.18837) generated from a constitution's content
classes (its ``restricted:`` and ``permitted:`` lists).

    python -m cai.pipeline run classifiers-tiny     # the default model on the CPU, a few minutes

    stages:
      class_prompts: {n: 2, styles: [direct, role-play], seed_sets: {red_team: restricted}}
      class_completions: {max_tokens: 64}

``class_prompts``: for each class, style (direct, role-play, obfuscated, multi-turn) and index
``i < n``, the engine writes one request of the class modelled on the class's example
``i mod len(examples)`` (prompts/class_prompt.jinja; the class text goes in as variables, never as
a template). For a restricted class, as many benign look-alikes (``lookalikes``) are written too.
The label comes from the class that generated the prompt: ``restricted`` for a restricted class's
own requests, ``permitted`` for a permitted class's and for every look-alike. A multi-turn reply
split by a ``---`` line becomes a conversation (user, ``ACK``, user). ``class_completions``: for
each prompt, a helpful answer and a refusal (prompts/class_response.jinja); the output label is
``restricted`` for a helpful answer to a restricted prompt, else ``permitted`` (by construction:
a small model's "helpful" answer may in fact refuse). Each stage then adds deterministic
augmentations (``augment``: case, whitespace and punctuation noise, a prefix/suffix wrapper) of its
texts as records of their own.

Seed sets: ``seed_sets`` maps a recipe source's path to the label its prompts get (the shipped
``red_team`` restricted; ``edgy_benign`` and ``helpful`` permitted); their prompts join as records
of class ``seed:<name>`` (the source's file stem, ``seed:red_team``). Sources not named there are not read by these stages.

Every record is keyed (``cai.keys.record_key``) by what defines it and written through the record
loop, so a killed run resumes; failed generations are error records, empty ones ``skipped``.
Exports (not for a shard): ``<run>/classifier_data/inputs.jsonl`` and ``outputs.jsonl``, and
``heldout_inputs.jsonl`` / ``heldout_outputs.jsonl``, one JSON object a line: ``prompt`` (a string,
or messages), ``label``, ``class``, ``style``, ``kind`` (class, lookalike or seed), ``augment``,
``group``, and for outputs ``response`` and ``response_kind``. The split is by group, so near-
duplicates never straddle it: a generated prompt's group is its class and seed example (every
style, look-alike, augmentation and completion of it goes with it); a seed set's is its
``category`` (else the record). In each class, a seeded ``heldout`` share of its groups is held
out (at least one where the class has two or more). Held-out files hold augmented rows too (filter
on ``augment``); a seed set's split follows the prompts a ``--limit`` leaves.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cai.config import FieldError, doc
from cai.constitution import ClassLabel, Constitution, load_constitution
from cai.data import load_prompts
from cai.engine import Sampling
from cai.export import write_jsonl
from cai.keys import in_shard, record_key, seed_for
from cai.pipeline.stage import Stage, StageContext, check_sampling, stage_records, usage
from cai.prompts import Template, load_template

if TYPE_CHECKING:
    from cai.record_loop import StageTally

Style = Literal["direct", "role-play", "obfuscated", "multi-turn"]
Augment = Literal["upper", "lower", "spaces", "punctuation", "wrapper"]
STYLES: tuple[str, ...] = ("direct", "role-play", "obfuscated", "multi-turn")
ACK = "Sure, go on."
"""The assistant turn between a multi-turn prompt's two user messages."""
WRAPPERS = (
    ("Quick question: ", ""),
    ("", " Thanks in advance."),
    ("Please answer this. ", ""),
    ("Hey, ", " Be brief."),
)
"""(prefix, suffix) pairs of the ``wrapper`` augmentation."""


@dataclass
class ClassPromptsStage:
    constitution: str | None = doc("constitution with the classes; none: the recipe's", None)
    classes: list[str] | None = doc("ids of the classes to generate for; none: all", None)
    styles: list[Style] = doc("request styles, each n times per class", factory=lambda: [*STYLES])
    n: int = doc("requests per (class, style)", 4)
    lookalikes: bool = doc("also n benign look-alikes per (restricted class, style)", True)
    template: str = doc("template of the generation request", "class_prompt")
    max_tokens: int = doc("most tokens of a generated request", 96)
    temperature: float = doc("0 is greedy", 1.0)
    top_p: float = doc("nucleus sampling", 0.95)
    augment: list[Augment] = doc(
        "augmentations of each prompt, records of their own",
        factory=lambda: ["lower", "spaces", "wrapper"],
    )
    heldout: float = doc("share of each class's groups held out (heldout_*.jsonl)", 0.2)
    seed_sets: dict[str, ClassLabel] = doc(
        "recipe source path → the label of its prompts, added as records", factory=dict
    )

    def validate(self) -> None:
        if self.n < 1:
            raise FieldError("n", f"must be >= 1 (got {self.n})")
        if not self.styles or len(set(self.styles)) != len(self.styles):
            raise FieldError("styles", "must list at least one style, each once")
        if not 0 <= self.heldout < 1:
            raise FieldError("heldout", f"must be in [0, 1) (got {self.heldout})")
        check_sampling(self)


@dataclass
class ClassCompletionsStage:
    template: str = doc("template of the response request", "class_response")
    max_tokens: int = doc("most tokens of a response", 128)
    temperature: float = doc("0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling", 1.0)
    augment: list[Augment] = doc(
        "augmentations of each response, records of their own", factory=lambda: ["wrapper"]
    )

    def validate(self) -> None:
        check_sampling(self)


@dataclass(frozen=True)
class Request:
    """One generated prompt to make: its class, style and which example it is modelled on."""

    cls: str
    label: ClassLabel
    lookalike: bool
    style: str
    index: int
    description: str = field(repr=False)
    examples: tuple[str, ...] = field(repr=False)

    @property
    def example(self) -> int:
        return self.index % len(self.examples)

    @property
    def group(self) -> str:
        return f"{self.cls}#{self.example}"


@dataclass(frozen=True)
class Prepared:
    constitution: Constitution
    requests: list[Request]
    prompt_template: Template
    seed_labels: dict[str, tuple[str, ClassLabel]]
    """Prompt key → (seed set's name, label) of the recipe's prompts named by ``seed_sets``; the
    name is the source's file stem, so that keys do not depend on where the source is."""


# ---- pure parts: augmentation and the split --------------------------------------------------


def augment_text(text: str, how: str, key: str) -> str:
    """``text`` augmented by ``how``, deterministically (noise is seeded by ``key``)."""
    rng = random.Random(f"{how}:{key}")
    if how == "upper":
        return text.upper()
    if how == "lower":
        return text.lower()
    if how == "spaces":
        words = text.split(" ")
        return "".join(w + rng.choice((" ", "  ", " \n")) for w in words[:-1]) + words[-1]
    if how == "punctuation":
        stripped = re.sub(r"[.,;:!?]", "", text)
        return stripped + rng.choice(("", "?", "!!", "..."))
    if how == "wrapper":
        prefix, suffix = rng.choice(WRAPPERS)
        return prefix + text + suffix
    raise ValueError(f"unknown augmentation {how!r}")


def heldout_groups(groups: dict[str, set[str]], fraction: float, seed: int) -> set[str]:
    """The held-out groups: in each class (``groups``: class → its groups), the ``fraction``
    (rounded, at least one where the class has two or more, never all) whose seeded hashes come
    first. A group's side depends only on its class's groups and the seed."""
    out: set[str] = set()
    for members in groups.values():
        if fraction <= 0 or len(members) < 2:
            continue
        ranked = sorted(members, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        k = min(max(round(fraction * len(ranked)), 1), len(ranked) - 1)
        out.update(ranked[:k])
    return out


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _augment_prompt(prompt: str | list[dict], how: str, key: str) -> str | list[dict]:
    if isinstance(prompt, str):
        return augment_text(prompt, how, key)
    *before, last = prompt
    return [*before, {**last, "content": augment_text(last["content"], how, key)}]


def parse_request(text: str, style: str) -> str | list[dict] | None:
    """A generated request: its text cleaned of quotes and a leading label; a multi-turn reply
    with two parts split by a ``---`` line, a conversation; None when nothing is left."""
    text = re.sub(r"^\s*(request|prompt|user)\s*:\s*", "", text.strip(), flags=re.I).strip()
    text = text.strip('"').strip()
    if style == "multi-turn":
        parts = [p.strip() for p in re.split(r"^\s*-{3,}\s*$", text, flags=re.M) if p.strip()]
        if len(parts) == 2:
            return [
                {"role": "user", "content": parts[0]},
                {"role": "assistant", "content": ACK},
                {"role": "user", "content": parts[1]},
            ]
        text = " ".join(parts)
    return text or None


# ---- class_prompts ---------------------------------------------------------------------------


def prepare_prompts(ctx: StageContext) -> Prepared:
    """The classes' requests, the template (test-rendered) and the seed sets' labels, before any
    work; refuses unknown class ids and a constitution without classes."""
    stage = ctx.recipe.stages.class_prompts
    constitution = load_constitution(stage.constitution or ctx.recipe.constitution)
    classes = constitution.content_classes()
    if not classes:
        raise ValueError(
            f"constitution {constitution.name!r} declares no restricted: or permitted: classes"
        )
    known = {c.id for _, c in classes}
    unknown = [c for c in stage.classes or () if c not in known]
    if unknown:
        raise ValueError(f"class_prompts.classes: unknown {unknown} (known: {sorted(known)})")
    requests = [
        Request(c.id, label, lookalike, style, i, c.description, c.examples)
        for label, c in classes
        if stage.classes is None or c.id in stage.classes
        for lookalike in ((False, True) if label == "restricted" and stage.lookalikes else (False,))
        for style in stage.styles
        for i in range(stage.n)
    ]
    template = load_template(stage.template)
    template.render(**_variables(requests[0]))
    seed_labels = {}
    for source in ctx.recipe.sources:
        if source.path in stage.seed_sets:
            options = {k: v for k, v in asdict(source).items() if k != "path"}
            for record in load_prompts(source.path, **options):
                name = Path(source.path).stem
                seed_labels[record.key] = (name, stage.seed_sets[source.path])
    return Prepared(constitution, requests, template, seed_labels)


def check_prompts_recipe(recipe: Any) -> None:
    paths = {s.path for s in recipe.sources}
    for path in recipe.stages.class_prompts.seed_sets:
        if path not in paths:
            raise ValueError(
                f"stages.class_prompts.seed_sets: {path!r} is not a source of the recipe "
                f"(sources: {sorted(paths)})"
            )


def _variables(r: Request) -> dict[str, Any]:
    return {
        "description": r.description,
        "examples": list(r.examples),
        "seed": r.examples[r.example],
        "style": r.style,
        "lookalike": r.lookalike,
    }


def _prompt_sampling(ctx: StageContext) -> Sampling:
    s = ctx.recipe.stages.class_prompts
    return Sampling(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)


def request_key(ctx: StageContext, r: Request) -> str:
    prepared: Prepared = ctx.prepared["class_prompts"]
    return record_key(
        stage="class_prompts",
        cls=r.cls,
        label=r.label,
        lookalike=r.lookalike,
        style=r.style,
        index=r.index,
        description=r.description,
        example=r.examples[r.example],
        template=prepared.prompt_template.source,
        model=ctx.recipe.model,
        sampling=_prompt_sampling(ctx).to_dict(),
    )


def _fields(r: Request) -> dict[str, Any]:
    return {
        "class": r.cls,
        "label": "permitted" if r.lookalike else r.label,
        "kind": "lookalike" if r.lookalike else "class",
        "style": r.style,
        "group": r.group,
    }


def run_prompts(ctx: StageContext, tally: StageTally) -> None:
    """Generated requests, the seed sets' prompts and their augmentations; leaves key → done
    record (augmentations aside) in ``ctx.outputs["class_prompts"]``."""
    prepared: Prepared = ctx.prepared["class_prompts"]
    stage = ctx.recipe.stages.class_prompts
    base = _prompt_sampling(ctx)
    keys = {r: request_key(ctx, r) for r in prepared.requests}
    requests = [r for r in prepared.requests if in_shard(keys[r], ctx.shard)]

    def call(batch, progress):
        chats = [prepared.prompt_template.render(**_variables(r)) for r in batch]
        seeds = [seed_for(keys[r], ctx.recipe.seed) for r in batch]
        params = [replace(base, seed=s) for s in seeds]
        done = ctx.engine_for(ctx.recipe.model).generate(chats, params, progress=progress)
        records = []
        for r, seed, c in zip(batch, seeds, done, strict=True):
            prompt = parse_request(c.samples[0].text, r.style) if c.ok else None
            records.append(
                {"key": keys[r], **_fields(r), "index": r.index, "prompt": prompt, "seed": seed}
                | {"usage": usage(c), "error": c.error}
                | ({"skipped": "empty request"} if c.ok and prompt is None else {})
            )
        return records

    generated = stage_records(
        ctx,
        "class_prompts",
        requests,
        key=keys.__getitem__,
        call=call,
        tally=tally,
        label="class_prompts",
    )
    seeds = _seed_records(ctx, prepared, tally)
    done = {k: r for k, r in {**generated, **seeds}.items() if _usable(r)}
    augmented = _augment(ctx, "class_prompts", done, stage.augment, "prompt", tally)
    ctx.outputs["class_prompts"] = done
    if ctx.shard is None:
        rows = [_input_row(r) for r in [*done.values(), *augmented.values()]]
        _export(ctx, rows, ctx.layout.classifier_inputs, ctx.layout.classifier_heldout_inputs)


def _usable(record: dict) -> bool:
    return record.get("error") is None and not record.get("skipped")


def _seed_records(ctx: StageContext, prepared: Prepared, tally: StageTally) -> dict[str, dict]:
    """The seed sets' prompts as records of class ``seed:<name>`` (no engine)."""
    items = [p for p in ctx.prompts if p.key in prepared.seed_labels]

    def key(p) -> str:
        return record_key(stage="class_prompts", input=p.key, seed_set=prepared.seed_labels[p.key])

    def call(batch, progress):
        out = []
        for p in batch:
            name, label = prepared.seed_labels[p.key]
            single = len(p.messages) == 1 and p.messages[0]["role"] == "user"
            out.append(
                {
                    "key": key(p),
                    "input_key": p.key,
                    "class": f"seed:{name}",
                    "label": label,
                    "kind": "seed",
                    "style": "seed",
                    "group": f"seed:{name}#{p.meta.get('category') or p.key}",
                    "prompt": p.messages[0]["content"] if single else p.messages,
                    "source": p.source,
                    "error": None,
                }
            )
        return out

    return stage_records(ctx, "class_prompts", items, key=key, call=call, tally=tally, label=False)


def _augment(
    ctx: StageContext, stage: str, done: dict[str, dict], hows: list[str], text: str, tally
) -> dict[str, dict]:
    """Augmentation records of ``done`` records' ``text`` field, in ``stage``'s file."""
    items = [(k, how) for k in done for how in hows]

    def key(item) -> str:
        return record_key(stage=stage, input=item[0], augment=item[1])

    def call(batch, progress):
        out = []
        for k, how in batch:
            record = {f: v for f, v in done[k].items() if f not in ("usage", "seed", "index")}
            changed = (
                _augment_prompt(record[text], how, k)
                if text == "prompt"
                else augment_text(record[text], how, k)
            )
            out.append(
                record | {"key": key((k, how)), "input_key": k, "augment": how, text: changed}
            )
        return out

    return stage_records(ctx, stage, items, key=key, call=call, tally=tally, label=False)


def _input_row(r: dict) -> dict:
    return {
        "prompt": r["prompt"],
        "label": r["label"],
        "class": r["class"],
        "style": r["style"],
        "kind": r["kind"],
        "augment": r.get("augment"),
        "group": r["group"],
    }


def _export(ctx: StageContext, rows: list[dict], train_path, heldout_path) -> None:
    """Rows split by group (:func:`heldout_groups`) into the training and held-out files."""
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["class"], set()).add(row["group"])
    for r in ctx.prepared["class_prompts"].requests:  # a class's groups, whatever failed
        groups.setdefault(r.cls, set()).add(r.group)
    held = heldout_groups(groups, ctx.recipe.stages.class_prompts.heldout, ctx.recipe.seed)
    write_jsonl([r for r in rows if r["group"] not in held], train_path)
    write_jsonl([r for r in rows if r["group"] in held], heldout_path)
    labels = {r["label"] for r in rows}
    ctx.result.add(
        train_path.stem,
        train_path,
        f"classifier data: {train_path} ({len(rows)} rows with held-out, labels {sorted(labels)})",
    )


def plan_prompts(ctx: StageContext) -> list[str]:
    prepared: Prepared = ctx.prepared["class_prompts"]
    done = _done(ctx, "class_prompts")
    keys = [request_key(ctx, r) for r in prepared.requests]
    todo = sum(k not in done and in_shard(k, ctx.shard) for k in keys)
    seeds = sum(p.key in prepared.seed_labels for p in ctx.prompts)
    return [
        f"  class_prompts: {todo} requests ({len(keys) - todo} done or in other shards), "
        f"{seeds} seed-set prompts → {ctx.layout.classifier_inputs}"
    ]


def _done(ctx: StageContext, stage: str) -> set[str]:
    path = ctx.store.stage_path(stage, ctx.shard)
    return ctx.store.done_keys(stage, ctx.shard) if path.exists() else set()


PROMPTS = Stage(
    name="class_prompts",
    doc="classifier prompts generated per content class and style, labelled by their class",
    options=ClassPromptsStage,
    run=run_prompts,
    plan=plan_prompts,
    starts=True,
    prepare=prepare_prompts,
    check_recipe=check_prompts_recipe,
    models=lambda ctx: {"policy": ctx.recipe.model},
)


# ---- class_completions -----------------------------------------------------------------------


def prepare_completions(ctx: StageContext) -> Template:
    template = load_template(ctx.recipe.stages.class_completions.template)
    template.render(conversation=[{"role": "user", "content": "fixture"}], refuse=True)
    return template


def completion_key(ctx: StageContext, prompt_key: str, refuse: bool) -> str:
    s = ctx.recipe.stages.class_completions
    return record_key(
        stage="class_completions",
        input=prompt_key,
        refuse=refuse,
        template=ctx.prepared["class_completions"].source,
        model=ctx.recipe.model,
        sampling=Sampling(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p
        ).to_dict(),
    )


def run_completions(ctx: StageContext, tally: StageTally) -> None:
    """A helpful answer and a refusal to every prompt of ``class_prompts``, and their
    augmentations; exports the output classifier's data."""
    s = ctx.recipe.stages.class_completions
    template: Template = ctx.prepared["class_completions"]
    prompts: dict[str, dict] = ctx.outputs["class_prompts"]
    base = Sampling(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)
    items = [(k, refuse) for k in prompts for refuse in (False, True)]
    items = [it for it in items if in_shard(completion_key(ctx, *it), ctx.shard)]

    def call(batch, progress):
        keys = [completion_key(ctx, k, refuse) for k, refuse in batch]
        chats = [
            template.render(conversation=as_messages(prompts[k]["prompt"]), refuse=refuse)
            for k, refuse in batch
        ]
        seeds = [seed_for(key, ctx.recipe.seed) for key in keys]
        params = [replace(base, seed=seed) for seed in seeds]
        done = ctx.engine_for(ctx.recipe.model).generate(chats, params, progress=progress)
        out = []
        for (k, refuse), key, seed, c in zip(batch, keys, seeds, done, strict=True):
            p = prompts[k]
            response = c.samples[0].text.strip() if c.ok else None
            out.append(
                {"key": key, "input_key": k, "class": p["class"], "style": p["style"]}
                | {"kind": p["kind"], "group": p["group"], "prompt": p["prompt"]}
                | {"prompt_label": p["label"], "response_kind": "refusal" if refuse else "helpful"}
                | {"label": output_label(p["label"], refuse), "response": response, "seed": seed}
                | {"usage": usage(c), "error": c.error}
                | ({"skipped": "empty response"} if c.ok and not response else {})
            )
        return out

    records = stage_records(
        ctx,
        "class_completions",
        items,
        key=lambda it: completion_key(ctx, *it),
        call=call,
        tally=tally,
        label="class_completions",
    )
    done = {k: r for k, r in records.items() if _usable(r)}
    augmented = _augment(ctx, "class_completions", done, s.augment, "response", tally)
    if ctx.shard is None:
        rows = [
            _input_row(r) | {"response": r["response"], "response_kind": r["response_kind"]}
            for r in [*done.values(), *augmented.values()]
        ]
        _export(ctx, rows, ctx.layout.classifier_outputs, ctx.layout.classifier_heldout_outputs)


def output_label(prompt_label: str, refuse: bool) -> ClassLabel:
    """A helpful answer to a restricted prompt is restricted; a refusal, or any answer to a
    permitted prompt, is permitted."""
    return "restricted" if prompt_label == "restricted" and not refuse else "permitted"


def plan_completions(ctx: StageContext) -> list[str]:
    return [
        f"  class_completions: 2 requests per generated prompt ({len(_done(ctx, 'class_completions'))} "
        f"records done) → {ctx.layout.classifier_outputs}"
    ]


COMPLETIONS = Stage(
    name="class_completions",
    doc="a helpful answer and a refusal to each classifier prompt, labelled for the output guard",
    options=ClassCompletionsStage,
    run=run_completions,
    plan=plan_completions,
    needs=("class_prompts",),
    prepare=prepare_completions,
    models=lambda ctx: {"policy": ctx.recipe.model},
)
