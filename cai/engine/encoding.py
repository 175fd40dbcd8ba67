"""Chat conversations → prompt token ids, one way for every backend.

Backends receive token ids, not text, so the HF and vLLM backends (and the OpenAI backend's
``score``) see exactly the same prompt for the same conversation: the model's own chat template
with the generation prompt, then the assistant prefix if one is given. Options for ``score`` are
tokenized on their own and appended, so an option's tokens never merge with the prompt's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from cai.engine.base import (
    Conversation,
    OptionScores,
    PromptTooLong,
    Sampling,
    check_chats,
    check_options,
    check_prefixes,
    per_request,
)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's own chat template."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{tokenizer.name_or_path}: the tokenizer has no chat template; the trainers render "
            "conversations with it, so pick a chat (instruct) model"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )["input_ids"]


class PromptEncoder:
    """Renders conversations with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer: Any, max_model_len: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the model's tokenizer has no chat template; cai needs an instruct/chat model "
                "(or set tokenizer.chat_template before creating the engine)"
            )
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.stop_token_ids = _stop_token_ids(tokenizer)

    def render_text(self, conversation: Conversation, prefix: str = "") -> str:
        text = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True
        )
        return text + prefix

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompts(
        self,
        conversations: Sequence[Conversation],
        prefixes: Sequence[str],
        *,
        new_tokens: Sequence[int],
        overflow: str,
    ) -> list[list[int] | str]:
        """Token ids per conversation; a string (the reason) where the prompt cannot run: it
        cannot be encoded, or it does not fit the context and ``overflow`` is 'error'.

        Raises ValueError for malformed conversations (checked before any work starts) and, when
        ``overflow`` is 'raise', PromptTooLong (a ValueError) for the first prompt that does not
        fit.
        """
        check_chats(conversations)
        out: list[list[int] | str] = []
        for i, (conversation, prefix) in enumerate(zip(conversations, prefixes, strict=True)):
            try:
                ids = self.encode(self.render_text(conversation, prefix))
            except (TypeError, ValueError, TemplateError) as e:
                # Text the tokenizer refuses (a lone surrogate makes the fast tokenizers raise
                # TypeError) or a chat template that raises for this conversation: that request
                # fails, the rest of the batch runs.
                out.append(f"the prompt cannot be encoded ({type(e).__name__}: {e})")
                continue
            if len(ids) + new_tokens[i] <= self.max_model_len:
                out.append(ids)
                continue
            reason = (
                f"prompt of {len(ids)} tokens plus {new_tokens[i]} new tokens exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )
            if overflow == "raise":
                raise PromptTooLong(f"conversation {i}: {reason}")
            out.append(reason)
        return out

    def encode_options(self, options: Sequence[str]) -> list[list[int]]:
        ids = [self.encode(o) for o in options]
        for option, tokens in zip(options, ids, strict=True):
            if not tokens:
                raise ValueError(f"option {option!r} encodes to no tokens")
        if len({tuple(t) for t in ids}) != len(ids):
            raise ValueError(f"options {list(options)!r} encode to the same tokens")
        return ids

    def prepare_generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling | Sequence[Sampling],
        prefixes: Sequence[str] | str | None,
        overflow: str,
    ) -> tuple[list[Sampling], list[list[int] | str]]:
        """Every backend's generate preamble: one validated Sampling per request and the prompt
        ids (a string, the reason, where a prompt cannot run: see ``encode_prompts``)."""
        params = per_request(sampling, len(conversations))
        prefixes = check_prefixes(prefixes, len(conversations))
        prompts = self.encode_prompts(
            conversations, prefixes, new_tokens=[p.max_tokens for p in params], overflow=overflow
        )
        return params, prompts

    def prepare_score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        prefixes: Sequence[str] | str | None,
        overflow: str,
    ) -> ScoreJob:
        """Every backend's score preamble: the options, their token ids, the prompt ids, and the
        results with the prompts that cannot run already failed."""
        options = check_options(options)
        option_ids = self.encode_options(options)
        longest = max(len(t) for t in option_ids)
        prefixes = check_prefixes(prefixes, len(conversations))
        prompts = self.encode_prompts(
            conversations, prefixes, new_tokens=[longest] * len(conversations), overflow=overflow
        )
        return ScoreJob(options, option_ids, prompts)


@dataclass
class ScoreJob:
    """A ``score`` call after its preamble: the backend fills ``results[i]`` for each request
    ``i`` of ``todo`` (:meth:`done` or :meth:`failed`); the rest failed before it started."""

    options: list[str]
    option_ids: list[list[int]]
    prompts: list[list[int] | str]
    results: list[OptionScores | None] = field(init=False)

    def __post_init__(self) -> None:
        self.results = [
            OptionScores(self.options, [], [], error=p) if isinstance(p, str) else None
            for p in self.prompts
        ]

    @property
    def todo(self) -> list[int]:
        """The requests whose prompt encoded and fits."""
        return [i for i, p in enumerate(self.prompts) if not isinstance(p, str)]

    @property
    def longest(self) -> int:
        """The most tokens of one option."""
        return max(len(t) for t in self.option_ids)

    def done(self, i: int, logprobs: Sequence[float]) -> None:
        self.results[i] = OptionScores(
            self.options, list(logprobs), [len(t) for t in self.option_ids], len(self.prompts[i])
        )

    def failed(self, i: int, error: str) -> None:
        self.results[i] = OptionScores(self.options, [], [], len(self.prompts[i]), error)


def _stop_token_ids(tokenizer: Any) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids
