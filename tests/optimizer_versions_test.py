"""DP optimizers whose Keras base came after Keras 3.0: Lamb, Muon and ScheduleFreeAdamW.

They are built only if the installed Keras has the base (``optimizers.KERAS_VERSION_NEEDED``
lists the release that added each). On an older Keras ``import tf_autoclip`` still works
and asking for one of them raises an AttributeError that names the Keras version it needs.
setup.py requires a Keras that has all of them.
"""

import contextlib
import json
import os
import re
import subprocess
import sys

import keras
import tensorflow as tf

import tf_autoclip as ac
from tf_autoclip import optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = {"DPAutoLamb": "Lamb", "DPAutoMuon": "Muon", "DPAutoScheduleFreeAdamW": "ScheduleFreeAdamW"}

# Run in a fresh process, as on a Keras older than 3.5: the bases are gone before
# tf_autoclip is imported (the DP classes are built at import).
_OLD_KERAS_SCRIPT = """
import json, sys
import keras
for base in ("Lamb", "Muon", "ScheduleFreeAdamW"):
    delattr(keras.optimizers, base)
import tf_autoclip
from tf_autoclip import optimizers
out = {"sgd": tf_autoclip.DPAutoSGD.__name__}
for name in ("DPAutoLamb", "DPAutoMuon", "DPAutoScheduleFreeAdamW"):
    out[name] = {"hasattr": hasattr(tf_autoclip, name) or hasattr(optimizers, name)}
    for where, module in (("package", tf_autoclip), ("optimizers", optimizers)):
        try:
            getattr(module, name)
        except AttributeError as e:
            out[name][where] = str(e)
    try:
        exec(f"from tf_autoclip import {name}")
    except ImportError:
        out[name]["from_import"] = "ImportError"
json.dump(out, sys.stdout)
"""


@contextlib.contextmanager
def _deleted(module, name):
    """``module.name`` removed for the duration (as if never built), then restored."""
    value = getattr(module, name)
    delattr(module, name)
    try:
        yield
    finally:
        setattr(module, name, value)


def _version(text):
    """(major, minor, patch) of a version string such as "3.15.1" or "3.16.0.dev2026"."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text).groups("0"))


class OptimizerVersionsTest(tf.test.TestCase):
    def test_built_on_this_keras(self):
        self.assertCountEqual(optimizers.KERAS_VERSION_NEEDED, BASES)
        for name, base in BASES.items():
            cls = getattr(ac, name)
            self.assertIs(cls, getattr(optimizers, name))
            self.assertTrue(issubclass(cls, getattr(keras.optimizers, base)), name)
            self.assertTrue(issubclass(cls, optimizers.DPOptimizerMixin), name)
            self.assertIs(optimizers.make_dp_optimizer_class(getattr(keras.optimizers, base)), cls)
            self.assertEqual(cls(learning_rate=0.1, noise_multiplier=1.0).noise_multiplier, 1.0)

    def test_missing_class_names_the_keras_it_needs(self):
        for name, base in BASES.items():
            needed = optimizers.KERAS_VERSION_NEEDED[name]
            with _deleted(ac, name), _deleted(optimizers, name):
                for module in (ac, optimizers):
                    with self.assertRaisesRegex(AttributeError, rf"{name} needs Keras >= {needed}"):
                        getattr(module, name)
                    with self.assertRaisesRegex(AttributeError, f"keras.optimizers.{base}"):
                        getattr(module, name)
                    self.assertFalse(hasattr(module, name))
            self.assertIs(getattr(ac, name), getattr(optimizers, name))

    def test_other_missing_attributes_are_plain_attribute_errors(self):
        for module in (ac, optimizers):
            with self.assertRaisesRegex(AttributeError, "has no attribute 'DPAutoNothing'"):
                module.DPAutoNothing  # noqa: B018

    def test_import_works_on_a_keras_without_the_bases(self):
        env = dict(os.environ)
        env.pop("TF_USE_LEGACY_KERAS", None)
        proc = subprocess.run(
            [sys.executable, "-c", _OLD_KERAS_SCRIPT],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        self.assertEqual(proc.returncode, 0, proc.stderr[-5000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertEqual(out["sgd"], "DPAutoSGD")
        for name, needed in optimizers.KERAS_VERSION_NEEDED.items():
            self.assertFalse(out[name]["hasattr"], name)
            for where in ("package", "optimizers"):
                self.assertIn(f"{name} needs Keras >= {needed}", out[name][where])
                self.assertIn(f"pip install 'keras>={needed}'", out[name][where])
            self.assertEqual(out[name]["from_import"], "ImportError")

    def test_setup_py_requires_a_keras_with_every_optimizer(self):
        with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
            match = re.search(r'"keras>=([0-9.]+)"', f.read())
        self.assertIsNotNone(match, "setup.py does not state a minimum Keras version")
        newest = max(map(_version, optimizers.KERAS_VERSION_NEEDED.values()))
        self.assertGreaterEqual(_version(match.group(1)), newest)
        self.assertGreaterEqual(_version(keras.__version__), newest)


if __name__ == "__main__":
    tf.test.main()
