#!/usr/bin/env bash
# Quick start, command 2: set up, then run the whole test suite (end-to-end tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
ruff check .
lint-imports --no-cache >/dev/null || lint-imports --no-cache  # folders import only downward
mypy  # static types: strict on the core, configured in pyproject's [tool.mypy]
# The docs site (guide + API reference); --strict: a broken link or docstring cross-reference fails.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site
exec python -m pytest -q "$@"
