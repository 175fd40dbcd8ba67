"""The judge part of every record key a judge's label is stored under: the pipeline's pairs,
``cai judge label``'s records and the evaluation's comparisons all take it from
:func:`judge_key`, a function of the judge's settings, the pair and the judge model.

It holds everything rendered into the judge's prompts besides the pair: the settings that
define the labels (``JudgeSettings.key_fields``: the template's text, mode, seed, ...), the
principles drawn for the pair with the question each was asked, and the rest of the prompt's
static text (``JudgeSettings.prompt_parts``: the system prompt and the exemplars, with the
questions they show). Editing any of it in a constitution re-judges exactly the records whose
prompts held it, wherever they are.

**Stores written before the static text joined the key** (issue 27) resume unchanged: that
text adds nothing to a key when it is what the shipped constitution of that name and principle
rendered then (:data:`SHIPPED`, digests of every shipped constitution's parts at that commit).
A constitution whose parts differ (a user's, or a shipped one edited since) puts their digests
in the key, so its records were judged with text the old key did not name and are judged once
more under the new key.
"""

from __future__ import annotations

from typing import Any

from cai.constitution import Principle
from cai.judge.pair import PairLike
from cai.judge.settings import JudgeSettings
from cai.keys import digest, model_key


def parts_digest(settings: JudgeSettings, principle: Principle) -> str:
    """A digest of the static text of ``principle``'s judge prompts under ``settings``."""
    return digest(settings.prompt_parts(settings.question(principle)))  # type: ignore[arg-type]


def _shipped_entry(settings: JudgeSettings, principle: Principle) -> str:
    return digest(
        [settings.constitution.name, principle.id, settings.mode, parts_digest(settings, principle)]
    )


def is_shipped(settings: JudgeSettings, principle: Principle) -> bool:
    """Whether ``principle``'s prompt text is what the shipped constitution of the same name
    rendered when it joined the key (so keys written before then hold it already)."""
    return _shipped_entry(settings, principle) in SHIPPED


def judge_key(settings: JudgeSettings, pair: PairLike, model: str) -> dict[str, Any]:
    """The judge's part of the record key of ``pair``'s label: the principles drawn for the pair
    ([id, question asked]), the settings (``key_fields``), the judge model
    (``cai.keys.model_key``) and, where not :func:`is_shipped`, the digests of each principle's
    prompt text."""
    principles = settings.principles_of(pair)
    key: dict[str, Any] = {
        "principles": [[p.id, settings.question(p)] for p in principles],
        "judge": settings.key_fields(),
        **model_key("model", model),
    }
    if not all(is_shipped(settings, p) for p in principles):
        key["rendered"] = [parts_digest(settings, p) for p in principles]
    return key


SHIPPED: frozenset[str] = frozenset(
    {
        "029644d514c19cc8",
        "02eeb813a9706d2d",
        "0331409aad141d26",
        "0668d11822494f18",
        "0776150a5b6d9f2d",
        "0995161867277cf2",
        "0a0ec8d837b40bc6",
        "0baf44ebc93748d3",
        "0f02e4b0b958786e",
        "10475a31c46ff400",
        "114dd1004c3cd3c3",
        "15a75e6e31fa814e",
        "15e28bc9feeac8f9",
        "1638e0c2dbbd10a7",
        "16aa36c25f286472",
        "18bc6b63d76e6c78",
        "18f711e03e6d3e17",
        "19583e31e839f70f",
        "1a4ca5739a8df281",
        "1d581cf562626a80",
        "2342a1705e0a4839",
        "2349dc65e8648f07",
        "2698506c3ebbbbe1",
        "26abf589ed719776",
        "276e2f68facc3a8f",
        "2bc90c22b7bad91e",
        "3261316af6562aaf",
        "33094df4ad4085e0",
        "34bd41d463327b9b",
        "34e4acb3939f8ac3",
        "352d20d0a3098757",
        "35721f76d9f802c5",
        "39b601268549e986",
        "39e29a287ed74678",
        "3ad2c8704daa0760",
        "3ba24fc60f2ed367",
        "3d9b97c400f14b51",
        "3fadff62e154f031",
        "4005ee0d51263696",
        "427cd07309b5a124",
        "43e29984d3f36845",
        "44860f574c4bcd7a",
        "4b251ace1bac5d61",
        "4c25b636883e9ffb",
        "4e21311bd52c3a12",
        "4e8d91310c48b27c",
        "4f49efbc0727b092",
        "5113d54984b24317",
        "51522dfd49668814",
        "53235e1c6e1e0baf",
        "55011f28aee4002e",
        "5506ad27cdf719ea",
        "553c8f3ce37f285a",
        "56a722dc8efd8824",
        "56c9529d12c1a012",
        "57eb747c75cd4441",
        "5bfb9dca30d938e9",
        "5ca95623b0e80788",
        "65a9705d0db5bab6",
        "65fec81084f10640",
        "694d7ad05468e87a",
        "6a2908bb2ff7d9d8",
        "6b8067359ad3328f",
        "6d8894e436327c82",
        "6df83a1b5b62b8b0",
        "6e062afd34e0acbb",
        "6ed3b84e645a1e64",
        "7277e58e18923241",
        "741098b070d13140",
        "76ac77c12e462add",
        "76b488e7da99d9a3",
        "77ca1c89dbaa8cd0",
        "77e4053429599d38",
        "77f0e15f515ee8ba",
        "783b65b7c1ad4bf4",
        "7a01c481f9e0ec06",
        "7c637ce4e144f93e",
        "7d18ff0b74c605ba",
        "7d3ba181e21418ac",
        "7da3eb0c4b0654b5",
        "7f83b7f1780bca92",
        "7fba5d40117ac8b5",
        "804753bad28e0269",
        "82750bd6fce6017a",
        "832b2bc1f88beec1",
        "857d5561486edac2",
        "86f58fa9933ac239",
        "88c4642167bdb3d5",
        "8ad30ddddebcf0bf",
        "8cd0d5d62b6b11b4",
        "8ebff07acd55389e",
        "8ed714cdab5745cd",
        "95298061330b3ba8",
        "960d1c33b28e2b2c",
        "97b1c655f7c9b81d",
        "98f2694f7140da05",
        "9aac000fc692b953",
        "9ad7eac9e264aaf5",
        "9aecb478b0aec7b4",
        "9b4d5e2d6c4ec0f5",
        "9f0ac0e00bc08688",
        "a1164a08a5b18a52",
        "a28c971a733e92be",
        "a3c0e00b922f2ed7",
        "a56660182045f16d",
        "a79d9270ebe1fe95",
        "ac4d061c30ee1613",
        "ad3693a7be658b8b",
        "b01d7a4ea2c592c8",
        "b31429ba7e3a65bb",
        "b4b5e1d0bc7b1a4c",
        "b4c8095d34d442a9",
        "b7f6ba66e3c178df",
        "b9b4654f7bffc672",
        "ba72fc01facbf4c0",
        "c0b47ae1722690d1",
        "c0eedf9291d6d977",
        "c45c253e10f766a6",
        "c49502c7b6dc0d4c",
        "c62235d40cb8c8bb",
        "c7cf0dee5c894384",
        "c83478c9648616e1",
        "c915c077dba6fed4",
        "cc3add6ccbb5f9e9",
        "cf4ed50a2f538930",
        "d4864ccdb58ac530",
        "da187173b35a98f7",
        "da4a8cac090750ee",
        "dfe0b89870144988",
        "e2dcba3e205edd69",
        "e2f65e204bd914ba",
        "e30013c4c8edf562",
        "e5b605d1cf464514",
        "e5e05324b1c1bf93",
        "e7052acd26a6cb67",
        "e7bb8758fbd582ee",
        "e8d88518f8078920",
        "e96199cee7bc2d2b",
        "ea9de2420250e2e7",
        "eb9022d848a054d2",
        "ecf322eb20d43bda",
        "ee9da20dea725083",
        "f0d7a520e5a8b92b",
        "f1b19145e85b311e",
        "f20cbf98b7a7b320",
        "f87c661bed320e25",
        "fb09df38c2eab7bb",
        "fbf3f0f562870eda",
        "fce8747964ec407c",
        "fde3b0da8217d29e",
        "fe0ef52ec7b73c96",
        "ff56c00126e99206",
    }
)
"""Entries (:func:`_shipped_entry`) of every shipped constitution's judge and score principles,
both modes, with and without exemplars, as shipped when the prompt text joined the key."""


__all__ = ["SHIPPED", "is_shipped", "judge_key", "parts_digest"]
