#!/usr/bin/env bash
# Run ComfyUI with this pack, like a user:
#
#   bash scripts/run_comfyui.sh                 # the real ComfyUI server on http://127.0.0.1:8188
#   bash scripts/run_comfyui.sh --port 8190     # another port (or GNRI_PORT=8190)
#   bash scripts/run_comfyui.sh -- --lowvram    # arguments after -- go to ComfyUI's main.py
#   bash scripts/run_comfyui.sh --demo          # headless: a real edit on the trained world
#                                               # models through the HTTP API; prints a table and
#                                               # writes gnri_demo.png (--out FILE, --help for more)
#
# ComfyUI: the one named by GNRI_COMFYUI_PATH, or the test ComfyUI 0.3.75 that the tests
# use (set up from nothing into .comfyui/, with .venv/, by scripts/setup_env.sh).
# The pack is added through an extra_model_paths file (.comfyui-run/), so a ComfyUI
# checkout is not modified; if the pack already lies in its custom_nodes, that copy is used.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PORT="${GNRI_PORT:-8188}"
demo=0
demo_args=()
comfy_args=()

usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1; shift; demo_args=("$@"); break ;;
    --port) PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; comfy_args+=("$@"); break ;;
    *) echo "unknown argument: $1 (ComfyUI's own arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [ ! -f .venv/.torch-ok ] || ! compgen -G ".venv/.reqs-*" >/dev/null \
    || { [ -z "${GNRI_COMFYUI_PATH:-}" ] && [ ! -f .comfyui/main.py ]; }; then
  echo "==> Setting up (first run: a virtual environment with torch and ComfyUI's requirements; minutes) ..."
fi
source scripts/setup_env.sh
COMFY="$GNRI_COMFYUI_PATH"

if [ "$demo" = 1 ]; then
  exec python scripts/demo.py "${demo_args[@]}"
fi

if ! python - "$PORT" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit(f"port {sys.argv[1]} on 127.0.0.1 is in use ({e}); choose another with --port N")
PY
then exit 1; fi

# The pack: already installed in this ComfyUI's custom_nodes, or added from here.
extra=()
installed=""
for entry in "$COMFY"/custom_nodes/*; do
  if [ -d "$entry" ] && [ "$(realpath "$entry")" = "$(realpath "$ROOT")" ]; then installed="$entry"; fi
done
if [ -z "$installed" ]; then
  run_dir="$ROOT/.comfyui-run"
  mkdir -p "$run_dir/custom_nodes"
  ln -sfn "$ROOT" "$run_dir/custom_nodes/ComfyUI-GNRI"
  cat > "$run_dir/extra_model_paths.yaml" <<EOF
# written by scripts/run_comfyui.sh: adds the comfyui-gnri pack to ComfyUI's custom_nodes
comfyui_gnri:
    custom_nodes: $run_dir/custom_nodes
EOF
  extra+=(--extra-model-paths-config "$run_dir/extra_model_paths.yaml")
  installed="$run_dir/custom_nodes/ComfyUI-GNRI"
fi
for sub in checkpoints diffusion_models text_encoders vae; do mkdir -p "$COMFY/models/$sub"; done

device=()
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  device=(--cpu)   # no GPU: ComfyUI would otherwise fail to pick a CUDA device
fi

cd "$COMFY"
python main.py --listen 127.0.0.1 --port "$PORT" --disable-auto-launch ${device[@]+"${device[@]}"} \
  ${extra[@]+"${extra[@]}"} ${comfy_args[@]+"${comfy_args[@]}"} &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; exit 130' INT TERM

if python - "$PORT" "$pid" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info/GNRIInvert", timeout=5) as r:
            sys.exit(0 if b"GNRIInvert" in r.read() else 2)
    except Exception:
        time.sleep(0.5)
sys.exit(1)
PY
then
  cat <<EOF

==> ComfyUI with comfyui-gnri is running:  http://127.0.0.1:$PORT
    ComfyUI:            $COMFY
    the pack:           $installed
    checkpoints:        $COMFY/models/checkpoints        (SD1.5, SD2.1, SDXL, SDXL-Turbo)
    Flux / SD3:         $COMFY/models/diffusion_models, text_encoders/, vae/
    example workflows:  Templates (left bar) > $(basename "$installed"), or drag a file from $ROOT/example_workflows/
    stop:               Ctrl+C

EOF
else
  echo "==> ComfyUI did not come up with the pack's nodes (see its log above)" >&2
  kill -TERM "$pid" 2>/dev/null || true
fi
wait "$pid"
