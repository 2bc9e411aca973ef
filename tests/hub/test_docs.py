"""The hub's generated configuration reference stays in step with the code."""

from __future__ import annotations

from appliance.hub.config import hub_reference
from tests.conftest import ROOT


def test_hub_configuration_reference_is_current() -> None:
    on_disk = (ROOT / "docs" / "hub-configuration.md").read_text(encoding="utf-8")
    assert on_disk == hub_reference(), (
        "docs/hub-configuration.md is stale: run `appliance hub config --reference > "
        "docs/hub-configuration.md`"
    )
