#!/usr/bin/env bash
# A separate venv with TensorFlow 2.15 and tensorflow-privacy 0.9.0, for the comparison in
# benchmarks/engines.py (--tfp). tensorflow-privacy 0.9.0 pins tensorflow~=2.15.
set -euo pipefail
VENV=${TFP_VENV:-/tmp/tfp-venv}
PYTHON=${PYTHON:-python3.11}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "tensorflow==2.15.*" "tensorflow-privacy==0.9.0"
"$VENV/bin/python" -c "import tensorflow as tf, tensorflow_privacy as tfp; print(tf.__version__, tfp.__version__)"
