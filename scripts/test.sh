#!/usr/bin/env bash
# Set everything up and run the default test suite (the CI job).
# Extra arguments go to pytest, e.g. scripts/test.sh --runslow -k crash
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": a suite that ran nothing is a failure here.
if [ "$rc" -eq 5 ]; then
    echo "test.sh: no tests were collected" >&2
    exit 1
fi
exit "$rc"
