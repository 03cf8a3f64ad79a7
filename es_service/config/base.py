"""What every section of the config shares: strict, frozen fields, and rules that say what is wrong
the same way.

A field's own rules sit in its annotation: ``rule`` (and ``check``, ``at_most``) refuse a value as
"VALUE; what is allowed", and the loader puts the field's path in front (es_service/config/load.py), so
one rule serves a section wherever it sits (es.w1, w2 and w3 share theirs). A rule across fields is a
model validator of the smallest section holding them all, raising ``ConfigError`` through ``require``
with a message that names every field it reads.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable
from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

TRAINING_IMAGES = 60000  # MNIST's training set


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: field, bad value, what is allowed."""


class Refused(ValueError):
    """A value its field's rule refuses, said as "VALUE; what is allowed": the loader puts the field's
    path in front."""


def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: whatever the input, a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def require(ok: bool, message: str) -> None:
    """A rule across fields: its message names every field it reads."""
    if not ok:
        raise ConfigError(message)


def check(ok: Callable[[Any], bool], message: Callable[[Any], str]) -> AfterValidator:
    """A field's rule: a value for which ``ok`` is false is refused with ``message(value)``. None (an
    optional field left unset) passes."""

    def refuse_unless_ok(value: Any) -> Any:
        if value is not None and not ok(value):
            raise Refused(message(value))
        return value

    return AfterValidator(refuse_unless_ok)


def rule(ok: Callable[[Any], bool], hint: str) -> AfterValidator:
    """A field's rule, refused as "FIELD: VALUE; HINT"."""
    return check(ok, lambda value: f"{value}; {hint}")


def at_most(limit: int) -> AfterValidator:
    """The upper bound of an integer that has no other: a larger value could only waste or break a run
    (the field's description names it)."""
    return check(
        lambda value: value <= limit,
        lambda value: f"{shown(value)} is more than any run can use; use at most {limit:,}",
    )


POSITIVE = rule(lambda value: 0 < value < math.inf, "use a finite number > 0")
AT_LEAST_ONE = rule(lambda value: value >= 1, "use an integer >= 1")
IMAGES = rule(
    lambda size: 1 <= size <= TRAINING_IMAGES, f"use an integer from 1 to {TRAINING_IMAGES} (the MNIST training set)"
)

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Section(BaseModel):
    """One block of the config. Strict types, because a value of the wrong type is a mistake in the file:
    a bool is not an int, nor "8" an int; an int widens to a float."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _float_text(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if (
            isinstance(value, str)
            and float in (annotation, *typing.get_args(annotation))
            and _FLOAT_TEXT.fullmatch(value.strip())
        ):
            return float(value)  # PyYAML reads `1e-3` (no dot) as a string
        return value
