#!/usr/bin/env bash
# Run `tokmeter demo` on a fresh machine: sets up .venv, then ingests the bundled
# samples through a real LightRAG on the JSON store with offline demo models.
# Usage: bash scripts/demo.sh [--json] [--workdir DIR] [...]   (see: tokmeter demo --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "" 
exec .venv/bin/tokmeter demo "$@"
