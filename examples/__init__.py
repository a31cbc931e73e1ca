"""The example scripts, importable as a package (``from examples import mnist_cnn``).

Run a script as a file, ``python examples/mnist_cnn.py`` (its folder is then on
``sys.path``, so the scripts import ``common`` and ``models`` directly), or as a module
from the repository root, ``python -m examples.mnist_cnn``; tests and benchmarks import
``examples.<name>``.
"""
