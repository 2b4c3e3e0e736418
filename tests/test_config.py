"""The one configuration mechanism (pipelines/config.py): typed checks with field names,
every problem at once, YAML overrides, defaults listed for --help."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from pipelines import config
from pipelines.errors import ConfigError, InputError


@dataclass(frozen=True)
class Inner:
    size: int = 3                     # how big
    ratio: float | None = None
    """None: no limit."""
    mode: Literal["no", "keep", "crop"] = "no"

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"size must be >= 1 (got {self.size})")


@dataclass(frozen=True)
class Rule:
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outer:
    name: str = field(metadata={"required": "name is required (give one)"})
    inner: Inner = field(default_factory=Inner)
    band: tuple[float, float] | None = (0.4, 0.6)
    tags: tuple[str, ...] = ("a",)
    rules: tuple[Rule, ...] = ()
    flag: bool = True
    k: int | None = None


def test_values_are_checked_against_their_hints_and_coerced():
    c = config.build(Outer, {"name": "x", "inner": {"size": 5, "ratio": 2, "mode": "crop"},
                             "band": [0.1, 0.2], "tags": ["p", "q"], "k": "1e3",
                             "rules": [{"id": "a.*", "fields": {"source": "s"}}]})
    assert c == Outer(name="x", inner=Inner(5, 2.0, "crop"), band=(0.1, 0.2), tags=("p", "q"),
                      k=1000, rules=(Rule("a.*", {"source": "s"}),))
    assert isinstance(c.inner.ratio, float) and isinstance(c.band, tuple)
    # defaults from the class when a group is absent
    assert config.build(Outer, {"name": "y"}) == Outer(name="y")


def test_every_problem_at_once_with_dotted_names():
    with pytest.raises(ConfigError) as e:
        config.build(Outer, {"inner": {"size": "big", "colour": 1}, "band": [1],
                             "flag": "yes please", "k": True, "extra": 0,
                             "rules": [{"id": 5}]}, source="run.yaml")
    assert e.value.problems == [
        "inner.size: expected an integer, got 'big'",
        "inner.colour: unknown key (known: mode, ratio, size)",
        "band: expected [a number, a number] or null, got [1]",
        "flag: expected true or false, got 'yes please'",
        "k: expected an integer or null, got True",
        "extra: unknown key (known: band, flag, inner, k, name, rules, tags)",
        "name is required (give one)"]
    assert str(e.value).startswith("run.yaml: ")
    # numbers where a string is expected are taken as text (YAML reads `id: 5` as 5)
    assert config.build(Outer, {"name": 2024, "rules": [{"id": 5}]}).rules[0].id == "5"


def test_a_groups_own_checks_run_once_its_types_are_right():
    with pytest.raises(ConfigError) as e:
        config.build(Outer, {"name": "x", "inner": {"size": 0}})
    assert e.value.problems == ["inner: size must be >= 1 (got 0)"]
    # a wrong type is reported instead of a confusing comparison error from __post_init__
    with pytest.raises(ConfigError) as e:
        config.build(Outer, {"name": "x", "inner": {"size": "abc"}})
    assert e.value.problems == ["inner.size: expected an integer, got 'abc'"]


def test_overrides_are_yaml_and_named_when_malformed():
    c = config.build(Outer, {"name": "x"}, overrides=["inner.size=7", "band=null", "tags=[u, v]",
                                                       "inner.mode=no", "flag=false"])
    assert (c.inner.size, c.band, c.tags, c.inner.mode, c.flag) == (7, None, ("u", "v"), "no", False)
    with pytest.raises(ConfigError) as e:
        config.parse_override("band=[0.4,")
    assert str(e.value).startswith("band: '[0.4,' is not a valid YAML value (")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.parse_override("inner.size")
    with pytest.raises(ConfigError, match="'inner.size' is a value, not a group"):
        config.apply_overrides({"inner": {"size": 3}}, ["inner.size.x=1"])
    # the caller's mapping is not changed
    doc = {"inner": {"size": 1}}
    config.apply_overrides(doc, ["inner.size=2"])
    assert doc == {"inner": {"size": 1}}


def test_yaml_booleans_for_words_are_taken_back_only_when_unambiguous():
    assert config.build(Outer, {"name": "x", "inner": {"mode": False}}).inner.mode == "no"
    with pytest.raises(ConfigError, match=r"inner.mode: True is not one of \['no', 'keep', 'crop'\] "
                                          r"\(YAML reads yes/no/on/off"):
        config.build(Outer, {"name": "x", "inner": {"mode": True}})


def test_describe_lists_every_key_with_default_type_and_doc():
    rows = {k: (t, d, doc) for k, t, d, doc in config.describe(Outer)}
    assert rows["name"][1] == "(required)"
    assert rows["inner.size"] == ("an integer", "3", "how big")
    assert rows["inner.ratio"] == ("a number or null", "null", "None: no limit.")
    assert rows["inner.mode"][:2] == ("one of no|keep|crop", "'no'")
    assert rows["band"][1] == "[0.4, 0.6]" and rows["flag"][1] == "true"
    text = config.help_text(Outer, "keys:")
    assert text.splitlines()[0] == "keys:" and "  inner.size = 3   (an integer)" in text


def test_load_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(InputError) as e:
        config.load_yaml(str(bad))
    assert "not valid YAML" in str(e.value) and "line " in str(e.value) and "\n" not in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(InputError, match="must be a mapping"):
        config.load_yaml(str(lst))
    with pytest.raises(InputError, match="file not found"):
        config.load_yaml(str(tmp_path / "nope.yaml"))
    assert config.load_yaml(str(_write(tmp_path / "empty.yaml", ""))) == {}


def _write(p, text):
    p.write_text(text)
    return p


def test_curate_train_and_a_recipe_shaped_config_share_it():
    """Curate and train load through it; a recipe-shaped tree (tuples of dataclasses with
    free-form mappings, as pipelines/mix/recipe.py has) builds with the same call."""
    from flows.curate_config import CurateConfig
    from mllm import config as train_config
    assert dataclasses.is_dataclass(CurateConfig)
    rows = [k for k, *_ in config.describe(CurateConfig)]
    assert {"select.k", "download.url_schemes", "embed.model", "runner.kind"} <= set(rows)
    trows = [k for k, *_ in config.describe(train_config.Config())]
    assert {"model.lm.hidden_size", "stage1.lr", "stage2.lr", "run.seed"} <= set(trows)
    # train defaults shown are the Config's (stage1.lr 5e-4 differs from StageConfig's 2e-4)
    assert dict((k, d) for k, _, d, _ in config.describe(train_config.Config()))["stage1.lr"] == "0.0005"
