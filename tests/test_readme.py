"""The documentation stays true and readable: every config field is in docs/configuration.md with the
code's default, the README stays short, and no doc points at work-log numbers or files outside the
repository."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from es_service.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIG_REFERENCE = ROOT / "docs" / "configuration.md"
README_LIMIT_BYTES = 15_000
# Pointers into a work log this repository does not hold: ticket or checkpoint numbers and an outside
# notes file. The words are joined from parts so that this file does not match its own pattern.
_LOG_WORDS = ("is" + "sue", "st" + "op", "FIND" + "INGS")
WORK_LOG_REFERENCE = re.compile(rf"\b{_LOG_WORDS[0]}\s+#?\d|\b{_LOG_WORDS[1]}\s+\d|{_LOG_WORDS[2]}", re.IGNORECASE)


def field_paths(cls=Config, prefix=""):
    for name, field in cls.model_fields.items():
        if isinstance(field.default, BaseModel):
            yield from field_paths(type(field.default), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def reference_row(text: str, path: str) -> list[str]:
    """The cells of the field's row: | `path` | type | default | description |."""
    row = next(line for line in text.splitlines() if line.startswith(f"| `{path}` |"))
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]  # an escaped \| stays in its cell


def test_every_config_field_is_in_the_configuration_reference():
    text = CONFIG_REFERENCE.read_text()
    missing = [path for path in field_paths() if f"| `{path}` |" not in text]
    assert not missing, f"document these fields in docs/configuration.md: {missing}"


def test_reference_defaults_match_the_code():
    text = CONFIG_REFERENCE.read_text()
    config = Config()
    for path in field_paths():
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        shown = (
            {None: "null", True: "true", False: "false"}.get(value, value)
            if not isinstance(value, (int, float, list)) or isinstance(value, bool)
            else value
        )
        default = reference_row(text, path)[2]
        assert default == str(shown), f"{path}: docs/configuration.md says {default}, code {shown}"


def test_the_readme_links_the_configuration_reference():
    assert "docs/configuration.md" in README.read_text()


def test_the_readme_stays_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes, over {README_LIMIT_BYTES}: move detail to docs/ and link it"
    )


def test_docs_cite_no_work_log():
    documents = [README, *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in documents
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if WORK_LOG_REFERENCE.search(line)
    ]
    assert not found, "pin figures by date, device and command, not by work-log number:\n" + "\n".join(found)
