"""tf-autoclip: differentially private Keras training with automatic clipping."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tf-autoclip",
    version="0.1.0",
    description="Differentially private training for TensorFlow/Keras with automatic clipping",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_autoclip", "tf_autoclip.*"]),
    python_requires=">=3.11",
    install_requires=[
        "tensorflow>=2.16",  # tested with 2.21
        # Tested with 3.15. 3.14 is the first with every optimizer tf_autoclip wraps:
        # keras.optimizers.Lamb came in 3.5, Muon in 3.10, ScheduleFreeAdamW in 3.14 (on an
        # older Keras, DPAutoLamb & co. are missing and say which Keras they need).
        "keras>=3.14",
        "dp-accounting>=0.4",
        "absl-py",
        "numpy",
        "scipy",
    ],
    extras_require={
        "examples": [
            "tensorflow-datasets",
            "importlib_resources",  # imported by tensorflow-datasets' download path
            "matplotlib",
        ],
        "hub": ["keras-hub>=0.32"],  # KerasHub models (tested with 0.32.0)
        "test": [
            "pytest",
            "pytest-xdist",  # the README's test command runs two processes
            "keras-hub>=0.32",
            "tf-keras>=2.16",  # the Keras 2 path (TF_USE_LEGACY_KERAS=1) is tested too
            "ruff",
            "scipy",
            "tensorflow-datasets",
            "importlib_resources",
            "matplotlib",
        ],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
