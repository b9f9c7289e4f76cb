#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs tokmeter and the test tools
# into .venv, starts PostgreSQL 15 and a MongoDB-wire server on 127.0.0.1, runs
# pytest (extra arguments are passed to it), then (for a full run) ruff, mypy --strict
# and the guide with mkdocs --strict, and stops the servers it started.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh test

cleanup() { bash scripts/services.sh stop || true; }
trap cleanup EXIT
bash scripts/services.sh start
# shellcheck disable=SC1091
source .services/env.sh

status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
    echo "test: ruff check and mypy --strict" >&2
    .venv/bin/ruff check --output-format concise tokmeter backends tests bench || status=$?
    .venv/bin/mypy tokmeter || status=$?
fi
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
    echo "test: building the guide (mkdocs build --strict)" >&2
    NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir .venv/site || status=$?
fi
exit "$status"
