"""Measured figures (parity errors, ratios) that tests record; conftest prints them at the end."""

REPORT: dict[str, object] = {}
