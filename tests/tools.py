"""The `tools` marker, kept honest: an external tool (Helm, promtool, the CRD validator run
with node, the offline wheel build) refuses to run for a test that is not marked
`@pytest.mark.tools`, so `make test-unit` (`-m "not integration and not tools"`) never needs
one and a test that does is never left unmarked."""

from __future__ import annotations

_allowed = False


def allow(allowed: bool) -> None:
    """Set by tests/conftest.py before each test's fixtures: is the test marked `tools`?"""
    global _allowed
    _allowed = allowed


def require(tool: str) -> None:
    if not _allowed:
        raise RuntimeError(f"{tool} is an external tool: mark the test @pytest.mark.tools")
