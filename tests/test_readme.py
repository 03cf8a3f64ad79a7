"""The README's config reference stays true: every config field is documented there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from es_service.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"


def field_paths(cls=Config, prefix=""):
    for field in dataclasses.fields(cls):
        value = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(value):
            yield from field_paths(type(value), f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def test_every_config_field_is_in_the_readme_reference():
    text = README.read_text()
    missing = [path for path in field_paths() if f"| `{path}` |" not in text]
    assert not missing, f"document these fields in README.md's configuration reference: {missing}"


def test_readme_defaults_match_the_code():
    text = README.read_text()
    config = Config()
    for path in field_paths():
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        shown = {None: "null", True: "true", False: "false"}.get(value, value) if not isinstance(value, (int, float)) or isinstance(value, bool) else value
        row = next(line for line in text.splitlines() if line.startswith(f"| `{path}` |"))
        assert row.split("|")[2].strip() == str(shown), f"{path}: README says {row.split('|')[2].strip()}, code {shown}"
