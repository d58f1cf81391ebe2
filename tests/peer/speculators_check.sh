#!/usr/bin/env bash
# Peer check of the speculators format against speculators 0.9.0 itself (see speculators_check.py).
# Run from dspark_hf's environment (python imports dspark_hf). speculators pins transformers <= 5.19, so it gets
# its own virtual environment: torch 2.13.0 first (the CPU wheel; a wider range pulls a CUDA build), then
# speculators without its dependencies (its CLI, data-generation and serving extras), plus the few that
# importing its DSpark model needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${SPECULATORS_VENV:-.ci/speculators-venv}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import speculators.models.dspark" 2>/dev/null; then
    python3 -m venv "$VENV"
    {
        "$VENV/bin/pip" install --quiet torch==2.13.0 &&
        "$VENV/bin/pip" install --quiet "transformers==5.19.0" pydantic loguru openai "datasets>=4,<=5.1.0" \
            "hs-connectors==0.9.0" &&
        "$VENV/bin/pip" install --quiet --no-deps speculators==0.9.0
    } > "$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; exit 1; }
fi
python tests/peer/speculators_check.py export --work "$WORK"
"$VENV/bin/python" tests/peer/speculators_check.py peer --work "$WORK" 2>&1 | grep -v "speculators.utils.loading" || true
test -f "$WORK/peer_report.json"
python tests/peer/speculators_check.py import --work "$WORK"
echo "speculators peer check: $(( $(date +%s) - start )) s"
