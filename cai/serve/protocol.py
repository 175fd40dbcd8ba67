"""``cai serve``'s protocol: the request bodies (pydantic, strict), their parsing into a 4xx
``BadRequest`` that names the field at fault, and the service's options (``cai serve``'s flags)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

ENDPOINTS = ("/get_reward", "/v1/reward", "/v1/judge", "/v1/classify", "/health", "/metrics")
Against = Literal["group", "reference", "score"]
"""How a completion is rewarded: against its group, against a reference, or the reward model's
raw score (``against=None`` in ``RewardModelReward``)."""


@dataclass
class ServeOptions:
    """The service's limits and the reward ``/get_reward`` gives (``cai serve``'s flags)."""

    max_batch: int = 64
    """Engine items (judge pairs, scored responses, reward-model conversations) per engine call."""
    max_wait_ms: float = 5.0
    max_queue: int = 65536
    """Engine items waiting for a batch, all requests together (else 503, retryable)."""
    max_items: int = 4096
    """Completions (or /v1/judge pairs, or /get_reward queries) in one request's body (else 413)."""
    max_pairs: int = 16384
    """Engine items one request may need: a group of G completions is G(G-1)/2 judge pairs, so
    this, not ``max_items``, bounds a group request's work (else 413, not retryable)."""
    max_body_bytes: int = 16 * 2**20
    read_timeout_s: float = 30.0
    """Seconds a client has to send its whole body (else 408): a stalled client holds no slot."""
    api_key: str | None = None
    against: Against | None = None
    """None: 'reference' with a pairwise judge, else 'score' (pointwise judge, reward model)."""
    num_generations: int | None = None
    centered: bool = False


def resolved_against(options: ServeOptions, *, judge_mode: str | None) -> Against:
    """The server's reward: ``--against``, else 'reference' with a pairwise judge, else 'score'
    (a pointwise judge's own score of each completion, or the reward model's)."""
    return options.against or ("reference" if judge_mode == "pairwise" else "score")


def check_options(
    options: ServeOptions, *, judge_mode: str | None, reward_model: bool, guard: bool = False
) -> None:
    """ValueError naming the ``cai serve`` flag at fault, before any model loads.
    ``judge_mode``: the judge's mode, None without a judge; ``guard``: a guard is served (alone,
    it takes no reward flags)."""
    for name in ("max_batch", "max_queue", "max_items", "max_pairs", "max_body_bytes"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if options.max_wait_ms < 0:
        raise ValueError("--max-wait-ms must be >= 0")
    if options.read_timeout_s <= 0:
        raise ValueError("--read-timeout must be > 0")
    if guard and judge_mode is None and not reward_model:
        if options.against is not None or options.num_generations is not None:
            raise ValueError("--against and --num-generations need a judge or a reward model")
        return
    against = resolved_against(options, judge_mode=judge_mode)
    if against == "score" and not reward_model and judge_mode != "pointwise":
        raise ValueError(
            "--against score is a completion's own score: give --reward-model, or serve the "
            "judge with --mode pointwise"
        )
    g = options.num_generations
    if against == "group" and (g is None or g < 2):
        raise ValueError(
            "--against group needs --num-generations G, the trainer's completions per prompt (>= 2)"
        )
    if against != "group" and g is not None:
        raise ValueError("--num-generations applies only to --against group")


class BadRequest(Exception):
    """A request the service refuses: its HTTP status, the field at fault and why."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


def _text_or_messages(value: Any) -> Any:
    """A string, or chat messages: a list of {"role", "content"} objects with string values."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return value
    raise ValueError(
        "expected a string or chat messages (a list of {role, content} objects), "
        f"got {json.dumps(value)[:80]}"
    )


Text = Annotated[Any, AfterValidator(_text_or_messages)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RewardBody(_Body):
    prompts: list[Text]
    completions: list[Text]
    references: list[Text] | None = None
    against: Against | None = None
    num_generations: int | None = None
    centered: bool | None = None
    scorer: Literal["judge", "reward_model"] | None = None


class OpenRLHFBody(_Body):
    # OpenRLHF versions and forks add fields (metas, ...): ignored, not refused.
    model_config = ConfigDict(strict=True, extra="ignore")
    query: list[str]
    prompts: list[str]
    labels: list[Any] | None = None


class PairBody(_Body):
    prompt: Text
    response_a: str
    response_b: str
    key: str | None = None


class JudgeBody(_Body):
    pairs: list[PairBody]


class OutputItem(_Body):
    messages: Text
    response: str


class ClassifyBody(_Body):
    inputs: list[Text] = []
    outputs: list[OutputItem] = []


def _parse(model: type[_Body], raw: bytes) -> Any:
    """The validated body; BadRequest 400 (not JSON) or 422 (the first field at fault)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "the body is nested too deep to parse") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise BadRequest(400, "the body is nested too deep to parse") from None
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        field = "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" if i else str(p)
            for i, p in enumerate(first["loc"])
        )
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise BadRequest(422, f"{field}: {message}{more}", field) from None


def _same_length(name: str, values: list, other: str, expected: int) -> None:
    if len(values) != expected:
        raise BadRequest(
            422, f"{name}: {len(values)} items, but {other} has {expected} (one each)", name
        )


__all__ = ["BadRequest", "ServeOptions", "check_options"]
