#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions that CI and the README's commands install.
#
#   scripts/refresh_pins.sh           newest releases pyproject.toml allows -> fresh venv -> test suite ->
#                                     constraints.txt rewritten only if the suite passes
#   scripts/refresh_pins.sh --check   the same, but leave constraints.txt as it is (does main pass on today's releases?)
#
# Takes as long as .ci/run (a fresh install, then the whole suite). torch stays at the CPU build CI pins.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-write}"
case "$mode" in
    write|--check) ;;
    *) echo "usage: scripts/refresh_pins.sh [--check]" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3.11 -m venv "$work/venv" 2>/dev/null || python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
echo "refresh_pins: installing the newest allowed releases into $work/venv" >&2
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"

echo "refresh_pins: running the test suite on them" >&2
set +e
python -m pytest -q
code=$?
set -e
if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then
    echo "refresh_pins: the suite fails on the newest releases (pytest exit $code); constraints.txt unchanged" >&2
    python -m pip freeze --exclude-editable | sed 's/+cpu$//' > "$work/newest.txt"
    diff constraints.txt <(grep -v '^#' "$work/newest.txt" | grep -v '^-e') || true
    exit 1
fi
if [ "$mode" = "--check" ]; then
    echo "refresh_pins: the suite passes on the newest releases; constraints.txt left as it is (--check)" >&2
    exit 0
fi
{
    echo "# Exact versions CI (.ci/run) and the README's commands install; pip install -c constraints.txt ..."
    echo "# Regenerate with scripts/refresh_pins.sh (writes only if the test suite passes on the new set)."
    echo "# Written $(date -u +%Y-%m-%d) on $(python --version 2>&1), $(uname -m)."
    python -m pip freeze --exclude-editable | grep -v '^-e' | grep -v '^#' | sed 's/+cpu$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "refresh_pins: constraints.txt rewritten ($(grep -vc '^#' constraints.txt) packages)" >&2
