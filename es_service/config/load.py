"""Reading a config: a YAML file and ``--set key=value`` overrides, parsed by es_service/safe_yaml.py
into the schema (es_service/config/schema.py); every problem becomes one ConfigError line naming the
field, the value and what is allowed.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from es_service import safe_yaml
from es_service.config.base import ConfigError, Refused, shown
from es_service.config.schema import Config

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of fields",
    "dict_type": "a mapping of fields",
    "list_type": "a list",
}


def _model_at(loc: list[str] | tuple[str, ...]) -> type[BaseModel] | None:
    """The section at ``loc``; None inside a field that is not a section (a list's items)."""
    section = Config
    for part in loc:
        fields = getattr(section, "model_fields", None)
        if fields is None or part not in fields:
            return None
        section = fields[part].annotation
    return section if hasattr(section, "model_fields") else None


def _rank(loc, depth: int, unknown: bool) -> tuple[int, Any]:
    part, section = loc[depth], _model_at(loc[:depth])
    if unknown and depth == len(loc) - 1:
        return 0, part
    return 1, part if section is None else list(section.model_fields).index(part)  # a list's items: by index


def _position(problem: dict[str, Any]) -> list[tuple[int, Any]]:
    """Where a reader meets the problem going through the file: a section's unknown keys first (a
    misspelt key explains the errors after it), by name, then its fields in order, depth first."""
    loc, unknown = problem["loc"], problem["type"] == "extra_forbidden"
    return [_rank(loc, depth, unknown) for depth in range(len(loc))]


def _order(problem: dict[str, Any]) -> tuple[bool, list[tuple[int, Any]]]:
    """Problems of structure and type first (a value of the wrong type is checked by no rule), then
    broken rules; each kind in the order a reader meets them."""
    return isinstance(problem.get("ctx", {}).get("error"), ValueError), _position(problem)


def _config_error(error: ValidationError) -> ConfigError:
    """The first of pydantic's problems, phrased like every other ConfigError: one line with the field
    path, the value and what is allowed."""
    problem = min(error.errors(include_url=False), key=_order)
    broken = problem.get("ctx", {}).get("error")
    if isinstance(broken, ConfigError):  # a rule across fields: its message names them
        return broken
    # a key is the user's text: an empty, long or unprintable one (a line break) is shown quoted and cut
    loc = [part if part.isprintable() and 0 < len(part) <= 40 else shown(part, 40) for part in map(str, problem["loc"])]
    path, value = ".".join(loc) or "the config", problem["input"]
    if isinstance(broken, Refused):  # a field's own rule: its section does not know where it sits
        return ConfigError(f"{path}: {broken}")
    if problem["type"] == "extra_forbidden":
        return ConfigError(
            f"{path}: unknown field; allowed in {'.'.join(loc[:-1]) or 'the config'}: "
            f"{', '.join(_model_at(loc[:-1]).model_fields)}"
        )
    if problem["type"] == "literal_error":
        allowed = ", ".join(typing.get_args(_model_at(loc[:-1]).model_fields[loc[-1]].annotation))
        if not isinstance(value, str):
            return ConfigError(f"{path}: expected a string ({allowed}), got {shown(value)}")
        return ConfigError(f"{path}: {shown(value)}; allowed: {allowed}")
    expected = _EXPECTED.get(problem["type"])
    if expected:
        return ConfigError(f"{path}: expected {expected}, got {shown(value)}")
    return ConfigError(f"{path}: {problem['msg'][:1].lower()}{problem['msg'][1:]}, got {shown(value)}")


def _yaml_problem(err: Exception) -> str:
    if isinstance(err, yaml.reader.ReaderError):  # its str() spans two lines
        character = chr(err.character) if isinstance(err.character, int) else err.character
        return f" at character {err.position + 1}: {character!r} ({err.reason})"
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(err, 'problem', None) or type(err).__name__}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {shown(text)}: expected key=value, e.g. --set es.noise_std=0.02")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {shown(text)}: empty key; expected key=value, e.g. --set generations=50")
    try:
        return key.split("."), safe_yaml.load(raw) if raw != "" else None
    except safe_yaml.TooLarge as err:
        raise ConfigError(f"--set {shown(text)} {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {shown(text)}: the value is not valid YAML{_yaml_problem(err)}; "
            "quote a string value, e.g. --set 'key=\"text\"'"
        ) from None


def _rename_head_members(data: Any) -> None:
    """es.head_pop_size, the members of the output layer only, is es.w3.pop_size now: configs and
    checkpoints written with the old name load unchanged."""
    es = data.get("es") if isinstance(data, dict) else None
    if isinstance(es, dict) and "head_pop_size" in es:
        w3 = es.setdefault("w3", {})
        if isinstance(w3, dict):
            w3.setdefault("pop_size", es.pop("head_pop_size"))


def from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Config:
    try:
        data = json.loads(json.dumps(data))  # deep copy; also rejects non-plain values early
    except (TypeError, ValueError) as err:  # ValueError: a list or mapping that holds itself
        raise ConfigError(
            f"the config holds a value that is not a plain number, string, list or mapping ({err}); "
            "quote dates and other special YAML values"
        ) from None
    _rename_head_members(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {shown(text)}: {part} is not a section")
        node[path[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _config_error(err) from None


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file to --config")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
    try:
        with path.open("rb") as file:
            raw = file.read(safe_yaml.MAX_BYTES + 1)  # never more: the file may be any size
        if len(raw) > safe_yaml.MAX_BYTES:
            raise ConfigError(
                f"config file {str(path)!r} is larger than {safe_yaml.MAX_BYTES >> 20} MiB; a config is a "
                "few KB of YAML: pass the config file itself"
            )
        data = safe_yaml.load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err.strerror}); check its permissions") from None
    except safe_yaml.TooLarge as err:
        raise ConfigError(f"config file {str(path)!r} {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{_yaml_problem(err)}") from None
    if data is None:  # an empty file: all defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: expected a mapping of fields at the top level, got {shown(data)} "
            "(e.g. `generations: 100`)"
        )
    return from_dict(data, overrides)
