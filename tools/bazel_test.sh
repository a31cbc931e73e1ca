#!/usr/bin/env bash
# The test suite under Bazel, offline: one py_test per tests/*_test.py (see BUILD).
#
#   bash tools/bazel_test.sh [extra `bazel test` flags]
#
# Installs Debian's bazel-bootstrap (4.2.3) if `bazel` is missing (needs root, as on CI),
# creates the README's test environment (.venv) if missing, runs `bazel test //...` and
# stops the Bazel server afterwards. Set TF_AUTOCLIP_BAZEL_PYTHON to use another Python
# environment instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bazel is not installed: apt-get install -y bazel-bootstrap (as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bazel-bootstrap
fi

if [ -z "${TF_AUTOCLIP_BAZEL_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e ".[test]"
fi

trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT
bazel test //... "$@"
