"""Generated bad input, so that the next hostile user finds nothing: configs and ``--set`` values of
every type, nesting, unicode, huge and non-finite numbers, YAML tags, anchors and aliases.

In-process, through the config loader: every example is a valid Config or a ConfigError of one line,
never another exception, and never more than ``MEMORY_LIMIT_MB`` of Python allocations. Then a few
through the real CLI: exit 0 with a finished run, or exit 2 with one line; never a traceback, never
more than a capped memory, never a changed byte in the run directory beside it.

The example counts are fixed (and derandomized, so every run tries the same examples);
conftest.py's terminal summary prints how many were tried and how many fuzz tests failed.
"""

from __future__ import annotations

import copy
import tempfile
import tracemalloc
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from es_service.config import Config, ConfigError, load
from tests.helpers import FUZZ_EXAMPLES, NO_CUDA, TINY, cap_cli_memory, cli, error_line, snapshot, write_config

IN_PROCESS_EXAMPLES = 300  # per in-process test below
CLI_EXAMPLES = 6
MEMORY_LIMIT_MB = 50
"""Most the loader may allocate for one example: the configs are a few KB, the bombs refused unexpanded."""


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,  # the same examples every run: a failure reproduces, a pass means the same
        database=None,  # nothing written into the checkout
        deadline=None,  # no wall-clock assertion: the machine may be busy
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any]]:
    fields = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            fields += _leaf_fields(info.annotation, f"{prefix}{name}.")
        else:
            fields.append((f"{prefix}{name}", info.annotation))
    return fields


FIELDS = _leaf_fields(Config)
CHEAP_FIELDS = [
    (path, annotation)
    for path, annotation in FIELDS
    if not path.startswith(("generations", "noise.", "workers.", "warm_start."))
    and "pop_size" not in path
    and "batch_size" not in path
]
"""What the CLI examples may set: no field that makes a valid run big (members, images, table, epochs,
Ray workers), so a valid example trains one tiny generation in seconds."""
CHOICES = sorted({str(arg) for _, annotation in FIELDS for arg in typing.get_args(annotation) if isinstance(arg, str)})

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # any unicode YAML can hold
NUMBERS = st.one_of(
    st.integers(),
    st.integers(-5, 70000),
    st.sampled_from([2**31, 2**63, -(2**63), 10**30, 10**99, 10**18 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 100),
    st.sampled_from([1e-320, 1e308, -0.0, 5e-324]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.sampled_from(CHOICES))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)
FRAGMENTS = st.sampled_from(
    [
        "!!binary aGk=",
        "!!python/object/apply:os.getpid []",
        "!!timestamp 2001-13-45",
        "2001-13-45",
        "2001-12-14",
        "!!float x",
        "!!int 0x",
        "!!int [1]",
        "!!float {a: 1}",
        "<<: [1]",
        "!!set {a}",
        "!!omap [a: 1]",
        "!!str",
        "!custom 1",
        "&a [1, 2]",
        "&b {seed: 1}",
        "*a",
        "*b",
        "<<: *b",
        "&c [*c]",
        ".nan",
        ".inf",
        "-.inf",
        "0x1F",
        "0o17",
        "1_000",
        "~",
        "yes",
        "1e400",
        "9" * 120,
        "[",
        "]",
        "{",
        "}",
        "? [a, b]",
        "? {a: 1}",
        "- ",
        "'",
        '"',
        "#",
        "|",
        ">",
        "%YAML 1.1",
        "---",
        "...",
        "generations",
        "es",
        "seed",
        "noise",
        "table_size",
        "pop_size",
        "w1",
    ]
)
RAW_YAML = st.lists(
    st.tuples(st.one_of(FRAGMENTS, TEXT), st.sampled_from(["", " ", "\n", "\n  ", ": ", ", "])), max_size=14
).map(lambda parts: "".join(piece + gap for piece, gap in parts))


def typed(annotation) -> st.SearchStrategy:
    """Values of a field's own type, small: configs that pass the types and often the ranges too."""
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    kinds = set(typing.get_args(annotation)) or {annotation}  # `float | None`: float and NoneType
    options = {int: st.integers(1, 64), float: st.floats(0.001, 1), bool: st.booleans(), str: TEXT}
    return st.one_of([options[kind] for kind in kinds if kind in options] + [st.none()] * (type(None) in kinds))


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...")


@st.composite
def config_dicts(draw, fields=FIELDS) -> dict:
    """TINY with one to four fields set to generated values, of the field's type or any, a few unknown
    keys sometimes."""
    data = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(1, 4))):
        path, annotation = draw(st.sampled_from(fields))
        *sections, leaf = path.split(".")
        if draw(st.integers(0, 9)) == 9:  # 9, not 0: the simplest examples hypothesis tries first set known fields
            leaf = draw(TEXT)
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = draw(st.one_of(typed(annotation), VALUES))
    return data


@st.composite
def overrides(draw, fields=FIELDS) -> list[str]:
    """--set texts: a field path (or any text) = a flow-style YAML value or raw YAML fragments."""
    texts = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from([path for path, _ in fields]), TEXT))
        value = draw(st.one_of(VALUES.map(_flow), RAW_YAML))
        texts.append(f"{key}={value}")
    return texts


def _aliases(levels: int, width: int) -> list[str]:
    """Anchor a0 holds width values, and each next anchor width aliases of the one before."""
    return [f"&a0 [{', '.join(['x'] * width)}]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)
    ]


@st.composite
def alias_bombs(draw) -> str:
    """A config of levels x width aliases (up to 12**10 values in a few hundred bytes), sometimes with
    a mapping that holds itself."""
    levels, width = draw(st.integers(1, 9)), draw(st.integers(2, 12))
    lines = [f"a{i}: {anchored}" for i, anchored in enumerate(_aliases(levels, width))]
    if draw(st.booleans()):
        lines.append(f"es: &self {{w1: *self, pop_size: *a{levels}}}")
    return "\n".join(lines) + "\n"


@st.composite
def alias_overrides(draw) -> str:
    """The same in one --set value: es=[&a0 [...], &a1 [*a0, ...], ...]."""
    return f"es=[{', '.join(_aliases(draw(st.integers(1, 9)), draw(st.integers(2, 12))))}]"


def loads_or_refuses(text: str | bytes, set_texts: list[str] = ()) -> None:
    """The property: a Config, or a one-line ConfigError; within MEMORY_LIMIT_MB."""
    outcome = "in-process, refused"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        tracemalloc.start()
        try:
            config = load(path, list(set_texts))
        except ConfigError as err:
            message = str(err)
            assert message and "\n" not in message and "\r" not in message, message
        else:
            assert isinstance(config, Config)
            outcome = "in-process, valid"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < MEMORY_LIMIT_MB << 20, f"the loader allocated {peak >> 20} MB"
    FUZZ_EXAMPLES[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _validation_imported():
    """The first validation imports the network module (and torch): not the examples' allocation."""
    load(write_config(Path(tempfile.mkdtemp()) / "tiny.yaml", TINY))


@fuzz_settings(IN_PROCESS_EXAMPLES)
@given(config_dicts(), overrides())
def test_generated_configs_load_or_are_refused_in_one_line(data, set_texts):
    loads_or_refuses(yaml.safe_dump(data, allow_unicode=True), set_texts)


@fuzz_settings(IN_PROCESS_EXAMPLES)
@given(st.one_of(RAW_YAML, st.binary(max_size=64)), overrides())
def test_raw_yaml_tags_and_bytes_load_or_are_refused_in_one_line(text, set_texts):
    loads_or_refuses(text, set_texts)


@fuzz_settings(IN_PROCESS_EXAMPLES // 3)
@given(alias_bombs(), st.lists(alias_overrides(), max_size=1))
def test_nested_aliases_are_refused_before_they_expand(text, set_texts):
    loads_or_refuses(text, set_texts)


# ---- the real CLI ----------------------------------------------------------------------------------


@pytest.mark.e2e
@example(data={**TINY, "es": {**TINY["es"], "noise_std": 0.05}}, set_texts=["eval.every=1"])  # one that trains
@fuzz_settings(CLI_EXAMPLES)
@given(
    st.one_of(config_dicts(CHEAP_FIELDS), alias_bombs()),
    overrides(CHEAP_FIELDS).map(lambda texts: [text for text in texts if "\0" not in text]),  # argv has no NUL
)
def test_generated_configs_through_the_cli(env, beside, data, set_texts):
    before = snapshot(beside)
    with tempfile.TemporaryDirectory(dir=beside.parent) as folder:
        folder = Path(folder)
        config = folder / "config.yaml"
        if isinstance(data, dict):
            write_config(config, {**data, "generations": 1})
        else:
            config.write_text(data)
        args = ["train", "--config", config, "--run-dir", folder / "run", "--quiet"]
        args += [arg for text in set_texts for arg in ("--set", text)]
        result = cli(*args, env={**env, **NO_CUDA}, cwd=folder, check=False, preexec_fn=cap_cli_memory)
        assert result.returncode in (0, 2), result.stderr
        if result.returncode == 0:
            assert result.stderr == "", result.stderr
            assert (folder / "run" / "checkpoint.pt").is_file() and '"generation"' in result.stdout
        else:
            error_line(result)
            assert not (folder / "run").exists()
    assert snapshot(beside) == before
    FUZZ_EXAMPLES["CLI, trained" if result.returncode == 0 else "CLI, refused"] += 1
