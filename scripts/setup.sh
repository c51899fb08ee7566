#!/usr/bin/env bash
# Set up r1serve in ./.venv and fetch the default model (smollm2-135m).
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # plus what the tests need (pytest, transformers, chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip

# torch first, and on purpose: a bare `torch` requirement on a machine without CUDA can
# pull a multi-GB CUDA build. Without a GPU, install the CPU build (TORCH_SPEC overrides;
# point PIP_INDEX_URL at PyTorch's CPU wheel index if your mirror has no CPU wheel).
if ! "$VPY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$VPY" -m pip install -q "${TORCH_SPEC:-torch>=2.4}"
    else
        "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"$VPY" -m pip install -q -e ".${extras}"

# The web UI tests drive Debian's chromium (`playwright install` would download a browser).
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && apt-get install -y -q chromium; } >/dev/null ||
            echo "warning: apt-get could not install chromium; tests/test_web_ui.py will skip" >&2
    else
        echo "warning: no /usr/bin/chromium (install Debian's chromium as root); tests/test_web_ui.py will skip" >&2
    fi
fi

# Build the hand-written CPU kernels now (about a minute, once) rather than on first use.
"$VPY" -c "from r1serve.kernels.cpu_extension import cpu_kernels; cpu_kernels()"

.venv/bin/r1serve pull smollm2-135m
