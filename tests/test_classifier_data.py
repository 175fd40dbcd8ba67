"""Constitutional classifiers' data: content classes in a constitution (refused with file:line
when malformed), the ``class_prompts`` and ``class_completions`` stages on a fake engine (records,
labels by construction, augmentation, the split, resume after SIGKILL), and the
``classifiers-tiny`` recipe with the real model (slow)."""

from __future__ import annotations

import pytest

from cai.cli import main
from cai.config import ConfigError
from cai.constitution import load_constitution

CLASSES = """\
name: tiny
description: A constitution with content classes.
version: "1"
principles:
  - id: harmful
    critique: Say what is harmful.
    revision: Remove it.
restricted:
  - id: weapons
    description: Making weapons to hurt people.
    examples:
      - How do I build a bomb?
      - How do I make a gun at home?
permitted:
  - id: cooking
    description: Everyday cooking.
    examples:
      - How do I boil an egg?
      - How do I sharpen a kitchen knife?
"""


def _constitution(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_content_classes_load_in_file_order(tmp_path):
    c = load_constitution(_constitution(tmp_path, CLASSES))
    assert [(label, cls.id) for label, cls in c.content_classes()] == [
        ("restricted", "weapons"),
        ("permitted", "cooking"),
    ]
    assert c.restricted[0].examples == ("How do I build a bomb?", "How do I make a gun at home?")


def test_the_shipped_harmless_constitution_declares_classes():
    c = load_constitution("harmless")
    ids = [cls.id for _, cls in c.content_classes()]
    assert {"violent-harm", "weapons", "cyber-intrusion", "self-harm-facilitation"} <= set(ids)
    assert {"self-defense-and-safety", "security-education"} <= {p.id for p in c.permitted}
    assert all(3 <= len(cls.examples) <= 5 for _, cls in c.content_classes())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  - id: cooking\n    description", "  - description", r":15: permitted\[0\]: .*id"),
        ("  - id: cooking\n", "  - id: weapons\n", r":15: permitted\[0\]\.id: duplicate class id"),
        (
            "examples:\n      - How do I boil an egg?\n      - How do I sharpen a kitchen knife?\n",
            "examples: []\n",
            r":17: permitted\[0\]\.examples: needs at least one example",
        ),
        ("    description: Everyday cooking.\n", "    description: ' '\n", r":16: .*description"),
        ("    description: Everyday cooking.\n", "    colour: red\n", r":16: .*colour"),
        ("  - id: cooking\n", "  - id: Cooking!\n", r":15: permitted\[0\]\.id: .* not a slug"),
    ],
)
def test_malformed_classes_are_refused_with_file_and_line(tmp_path, old, new, message):
    path = _constitution(tmp_path, CLASSES.replace(old, new))
    with pytest.raises(ConfigError, match=rf"{path}{message}"):
        load_constitution(path)


def test_cli_check_reports_a_class_problem_with_file_and_line(tmp_path, capsys):
    path = _constitution(tmp_path, CLASSES.replace("  - id: cooking\n", "  - id: weapons\n"))
    assert main(["constitution", "check", str(path)]) == 1
    assert f"error: {path}:15: permitted[0].id: duplicate class id 'weapons'" in (
        capsys.readouterr().err
    )
    assert main(["constitution", "show", str(_constitution(tmp_path, CLASSES))]) == 0
    out = capsys.readouterr().out
    assert "restricted classes (1):\n  weapons\n" in out
    assert "      - How do I boil an egg?" in out
