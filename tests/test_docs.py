"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

from appliance import config
from tests.conftest import ROOT


def test_configuration_reference_is_current() -> None:
    on_disk = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert on_disk == config.reference(), (
        "docs/configuration.md is stale: run `appliance config --reference > docs/configuration.md`"
    )


def test_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "./scripts/run" in readme
    assert "./scripts/test" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test" in ci
