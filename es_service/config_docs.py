"""docs/configuration.md, generated from the config models by
``python -m es_service.config_docs > docs/configuration.md``.

One table per section (field, type, default, description); the descriptions are the fields' docstrings in
es_service/config/, so the reference cannot drift from the code. tests/test_config.py fails when the
file is stale.
"""

from __future__ import annotations

import sys
import typing

from pydantic import BaseModel

from es_service import safe_yaml
from es_service.config import Config

COMMAND = "python -m es_service.config_docs > docs/configuration.md"

INTRO = f"""# Configuration reference

<!-- Generated from es_service/config/ by `{COMMAND}`; edit the field docstrings there, not this file. -->

A run is configured by one YAML file. Every field is optional; a missing field takes the default
below. Override any field on the command line with `--set section.field=value` (repeatable), e.g.
`--set es.noise_std=0.01` or `--set es.w1.pop_size=256`. Unknown keys, wrong types, duplicate keys
and bad values are refused before anything starts: the message names the field, the value and what
is allowed (exit code 2). The YAML is read safely (no tag runs code) within bounds checked before
any value is built from it: at most {safe_yaml.MAX_BYTES >> 20} MiB and {safe_yaml.MAX_NODES:,} values with every alias expanded,
lists and mappings at most {safe_yaml.MAX_DEPTH} deep, integers of at most {safe_yaml.MAX_INT_DIGITS} digits, no alias inside
the node it names. Integer fields have upper bounds past which no run could go (given below).

The types and descriptions are those of the models in `es_service/config/`, where each field has a docstring.
`float | null` means a number or `null`; an integer is accepted where a number is. In YAML, `null`
stands for Python's `None`. The design behind the arithmetic, low-rank members and layer members is in
[design.md](design.md).

Old configs and checkpoints that set `es.head_pop_size` still load: the value becomes
`es.w3.pop_size`.
"""

RULES = """## Rules across fields

* `es.pop_size` must be even when `es.antithetic` is true; each `es.wN.pop_size` must be even.
* `cpu-ftz` refuses GPUs (`workers.gpus_per_worker > 0`, `workers.device: cuda`), low rank, the
  shared first layer, layer members and a warm start: they all need the scaled frame or autograd.
* `es.shared_first_layer` and `es.rank ≥ 1` exclude each other (low-rank members already share x·W1).
* A config whose noise table, population or minibatch would need more memory than the machine has
  is refused, naming the field with the largest share.
* `resume` accepts `--set` only for fields that cannot change θ's path (`generations`, `data_dir`,
  `workers.*`, `eval.*`, `checkpoint.*`); `generations` only when no `es.*_final` schedule stretches
  over it (otherwise start a new run).
"""


def _type(annotation: typing.Any) -> str:
    """int, float \\| null, or a choice's values: tf-ftz \\| linear \\| cpu-ftz."""
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"list of {_type(typing.get_args(annotation)[0])}"
    names = [arg.__name__ if arg is not type(None) else "null" for arg in typing.get_args(annotation) or [annotation]]
    return " \\| ".join(names)


def _default(value: typing.Any) -> str:
    """As YAML writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _text(description: str | None) -> str:
    return " ".join((description or "").split()).replace("|", "\\|")


def sections(model: type[BaseModel], path: str, intro: str | None):
    """(path, intro, model) of the section and of each section nested in it, in field order."""
    yield path, intro, model
    for name, field in model.model_fields.items():
        if isinstance(field.default, BaseModel):
            yield from sections(type(field.default), f"{path}{name}.", field.description)


def render() -> str:
    parts = [INTRO]
    for path, intro, model in sections(Config, "", None):
        heading = f"`{path.rstrip('.')}`" if path else "Top level"
        rows = [
            f"| `{path}{name}` | {_type(field.annotation)} | {_default(field.default)} | {_text(field.description)} |"
            for name, field in model.model_fields.items()
            if not isinstance(field.default, BaseModel)
        ]
        parts.append(
            "\n".join(
                [
                    f"## {heading}",
                    "",
                    *([_text(intro), ""] if intro else []),
                    "| field | type | default | description |",
                    "|---|---|---|---|",
                    *rows,
                ]
            )
            + "\n"
        )
    parts.append(RULES)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.buffer.write(render().encode("utf-8"))
