#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf_sdt with its test tools. The CPU build of torch is pinned first:
# a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
# transformers 5.25 requires the `kernels` distribution and imports it as `kernels`, the name of this checkout's
# top-level kernels/ folder (installed, it is hf_sdt.kernels): run from the checkout (pytest, python -m ...), the
# folder shadows the distribution and transformers fails to import. The development install stays below 5.25.
.venv/bin/python -m pip install -q -e ".[dev]" "transformers<5.25"
