"""Typed YAML (``cai.config``): the alias-bomb guard, short values in errors, and errors that
name the field and line a dataclass's ``validate`` complains about (or the ``--set`` it came from).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cai.config import (
    ConfigError,
    FieldError,
    doc,
    from_data,
    load_yaml,
    parse_yaml,
    set_dotted,
)


def alias_bomb(levels: int, width: int = 9) -> str:
    """'Billion laughs': each anchor is a list of ``width`` aliases of the one before, so the
    last expands to ``width ** levels`` strings from a few hundred bytes of YAML."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)  # expanded, the bomb runs for minutes and out of memory
def test_an_alias_bomb_is_refused_before_it_expands():
    text = alias_bomb(9)  # 9**9 = 387M strings once expanded
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "bomb.yaml")
    message = str(info.value)
    # Aliases of l5 (line 6) push the document past the bound: 9 * 66,430 values.
    assert message.startswith("bomb.yaml:6: "), message
    assert "aliases" in message and "100,000" in message, message
    assert len(message) < 400, message


def test_normal_anchor_use_still_loads():
    text = (
        "base: &base {temperature: 0.5, top_p: 0.9}\n"
        "a: *base\n"
        "b: {<<: *base, top_p: 0.8}\n"
        "many: [*base, *base, *base, *base]\n"
    )
    data = parse_yaml(text)
    assert data["a"] == {"temperature": 0.5, "top_p": 0.9}
    assert data["b"] == {"temperature": 0.5, "top_p": 0.8}
    assert data["many"] == [data["a"]] * 4


def test_a_recursive_alias_is_refused_with_its_line():
    with pytest.raises(ConfigError, match=r"^r.yaml:2: .*refers to itself"):
        parse_yaml("ok: 1\nloop: &a [1, *a]\n", "r.yaml")


@dataclass
class _Small:
    name: str = doc("a name")


def test_errors_print_at_most_a_short_excerpt_of_a_value(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: [" + ", ".join(f"item{i}" for i in range(20_000)) + "]\n")
    with pytest.raises(ConfigError) as info:
        from_data(_Small, load_yaml(path), source=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:1: name: expected a string, got LineList ['item0', ")
    assert message.endswith("...]"), message
    assert len(message) < 400, message


@dataclass
class _Stage:
    top_p: float = doc("nucleus sampling", 1.0)
    rounds: int = doc("rounds", 1)

    def validate(self) -> None:
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1] (got {self.top_p})")


@dataclass
class _Outer:
    stage: _Stage = doc("a stage")


def test_a_field_error_names_the_field_its_line_and_the_set_that_gave_it():
    data = parse_yaml("stage:\n  rounds: 2\n  top_p: 0\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml:3: stage.top_p: must be in \(0, 1\] \(got 0"):
        from_data(_Outer, data, source="r.yaml")
    data = parse_yaml("stage:\n  rounds: 2\n", "r.yaml")
    set_dotted(data, "stage.top_p=1.5")
    with pytest.raises(ConfigError) as info:
        from_data(_Outer, data, source="r.yaml")
    assert (
        str(info.value)
        == "r.yaml (--set stage.top_p=1.5): stage.top_p: must be in (0, 1] (got 1.5)"
    )
    data = parse_yaml("{}", "r.yaml")
    set_dotted(data, "stage={rounds: x}")
    with pytest.raises(ConfigError, match=r"^r.yaml \(--set stage=\{rounds: x\}\): stage.rounds: "):
        from_data(_Outer, data, source="r.yaml")


@dataclass
class _Drift:
    max_length_drift: float = doc("a threshold with no validate of its own", 0.5)


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf"])
def test_a_float_setting_refuses_nan_and_infinities(value):
    # NaN compares false with everything: a threshold set to it would never fire.
    data = parse_yaml("max_length_drift: 0.5\n", "r.yaml")
    set_dotted(data, f"max_length_drift={value}")
    with pytest.raises(ConfigError, match=r"^r.yaml \(--set .*\): max_length_drift: must be a fin"):
        from_data(_Drift, data, source="r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml:2: max_length_drift: must be a finite number"):
        from_data(_Drift, parse_yaml(f"\nmax_length_drift: {value}\n", "r.yaml"), source="r.yaml")
