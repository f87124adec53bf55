"""Checks of user options shared by the tracker, the background worker and the adapters, so each
option is refused with the same message wherever it is given."""

from __future__ import annotations


def positive_int(name: str, value: object, optional: bool = False) -> int | None:
    """``value`` if it is an integer >= 1 (or None when ``optional``); else a ValueError naming it."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value
