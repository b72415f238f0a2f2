#!/usr/bin/env bash
# GPU check: CPU vs NVDEC decode frames/s (596x336 and 1920x1080 clips made with PyAV), CLIP ViT-L/14 encode
# images/s in fp16, and a short bf16 training step through the normal vlp CLI, written as one JSON file:
# bench/results/gpu_check.json (bench/bench_gpu.py does the measuring; its docstring says what each number is).
#
#   bench/gpu_check.sh            on a machine with an NVIDIA GPU: checks nvidia-smi, installs torchcodec into the
#                                 Python environment (never touching torch), runs everything on cuda
#   bench/gpu_check.sh --cpu      the same script on the CPU only (no nvidia-smi, no install):
#                                 bench/results/gpu_check.cpu.json; what a GPU-less machine can check
#   --quick                       1 clip per size and 1 round (a sanity run; results/*.quick.json)
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3); VLP_WHEELS, a folder of wheels for an
# offline machine (pip install --no-index --find-links); TORCHCODEC_SPEC to pin the torchcodec version.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=()
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu ;;
    --quick) QUICK=(--quick) ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --cpu, --quick)" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
say() { echo "[gpu_check] $*"; }

"$PY" -c "import vlp, av, decord, ray, deepspeed, torch" || {
  echo "gpu_check.sh: $PY lacks vlp's dependencies (pip install -e . -c constraints.txt)" >&2; exit 2; }
say "python $PY; vlp from $("$PY" -c 'import vlp, os; print(os.path.dirname(vlp.__file__))')"

install_torchcodec() {
  # torchcodec has no torch dependency in its metadata: pick the release built for this torch, install it
  # without dependencies so torch is never replaced (the README's compatibility table, torchcodec 0.17)
  local torch_v spec
  torch_v=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  case "$torch_v" in
    2.9.*) spec="torchcodec==0.9.*" ;;
    2.10.*) spec="torchcodec==0.10.*" ;;
    *) spec="torchcodec>=0.11" ;;
  esac
  spec="${TORCHCODEC_SPEC:-$spec}"
  say "torch $torch_v (cuda $("$PY" -c 'import torch; print(torch.version.cuda)')): installing $spec"
  local src=()
  [[ -n "${VLP_WHEELS:-}" ]] && src=(--no-index --find-links "$VLP_WHEELS")
  "$PY" -m pip install --no-deps "${src[@]}" "$spec" || say "WARNING: could not install $spec; NVDEC numbers will record why"
  if ! ldconfig -p 2>/dev/null | grep -q "libavcodec\.so"; then
    say "WARNING: no FFmpeg shared libraries (libavcodec.so.*) found; torchcodec needs FFmpeg 4-8 (apt-get install ffmpeg)"
  fi
}

if [[ "$DEVICE" == cuda ]]; then
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: nvidia-smi not found: no NVIDIA GPU here (use --cpu)" >&2; exit 2; }
  VLP_GPU_CHECK_SMI="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  export VLP_GPU_CHECK_SMI
  say "GPU: $VLP_GPU_CHECK_SMI"
  "$PY" -c "import torchcodec" 2>/dev/null && say "torchcodec already installed" || install_torchcodec
fi

mkdir -p bench/results
"$PY" bench/bench_gpu.py --device "$DEVICE" "${QUICK[@]}"
