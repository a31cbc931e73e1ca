"""The library's doctests under Bazel (``bazel test //:doctests_test``, see BUILD).

pytest runs every module's doctests (``--doctest-modules`` in pyproject.toml's addopts);
Bazel runs one py_test per tests/*_test.py, which would skip them. This script runs the
doctests of ``tf_autoclip/`` (every module with a ``>>>`` example) exactly as pytest does,
by running pytest on that directory with the repository's pyproject.toml: same collection,
same option flags and globals (none beyond each module's own; there is no
``doctest_namespace`` fixture). It is not a *_test.py file, so pytest does not run the
doctests twice.

    python tests/run_doctests.py [extra pytest flags]
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    args = [
        "-c", os.path.join(ROOT, "pyproject.toml"),
        "--rootdir", ROOT,
        "-p", "no:cacheprovider",
        "--doctest-modules",
        "-q",
        os.path.join(ROOT, "tf_autoclip"),
    ]  # fmt: skip
    if os.environ.get("XML_OUTPUT_FILE"):  # set by `bazel test`
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    return int(pytest.main(args + argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
