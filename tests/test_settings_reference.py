"""docs/reference/settings.md (tools/settings_reference.py): current with the schema, and every setting described."""

from __future__ import annotations

from pipeline.settings.base import PROJECT_ROOT
from tools.settings_reference import COMMAND, PAGE, render, sections


def test_the_committed_settings_page_is_what_the_schema_makes():
    page = PROJECT_ROOT / PAGE
    committed = page.read_text() if page.is_file() else ""
    assert committed == render(), f"{PAGE} is stale: run `{COMMAND}` and commit it"


def test_every_setting_and_section_has_a_description():
    found = sections()
    missing = [section.name for section in found if not section.description.strip()]
    missing += [row.key for section in found for row in section.rows if not row.description.strip()]
    assert not missing, (
        "add `description=` to these fields (a section: a docstring on its model) in pipeline/settings/: "
        + ", ".join(missing)
    )
