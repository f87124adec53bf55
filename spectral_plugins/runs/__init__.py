"""Tracked runs after the fact: read a run back from a tracker or a saved file, compare runs, render a
report. Imports each tracker's reader lazily."""
