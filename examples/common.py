"""Plumbing the example scripts share: flags, data, Keras training, results.

The scripts make the ``tf_autoclip`` calls themselves (``make_private``, the
``DPAuto<Optimizer>``, ``poisson_sample``, ``PrivacyCallback``, ``privacy_statement``:
see ``mnist_cnn.py``'s ``train_and_evaluate``); this module holds what is not about the
library, once:

* the common absl flags (a public contract: keep their names), see ``--help``;
* data: tensorflow_datasets by default (``tfds.load``, downloads on first use), or a
  local copy with ``--data_dir=DIR`` / ``TF_AUTOCLIP_DATA_DIR=DIR`` holding
  ``mnist.npz``, ``fashion_mnist.npz`` (Keras layout) and ``sst2/{train,dev}.tsv``;
* ``fit_and_evaluate``: compiles, fits (on Poisson-sampled or shuffled batches) and
  evaluates a model with a given optimizer, returning the result record;
  ``train_non_private``: the ``--non_private`` baseline (plain Keras, no guarantee);
* ``finish``: prints the privacy statement and the final line, writes
  ``--output_json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from absl import app, flags

DATA_DIR_ENV = "TF_AUTOCLIP_DATA_DIR"


def _keras_optimizers() -> dict[str, type]:
    """Every Keras optimizer class by lower-case name (sgd, adam, adamw, ...)."""
    found = {}
    for name in dir(keras.optimizers):
        cls = getattr(keras.optimizers, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, keras.optimizers.Optimizer)
            and cls is not keras.optimizers.Optimizer
            and "learning_rate" in inspect.signature(cls.__init__).parameters  # no wrappers
        ):
            found[name.lower()] = cls
    return found


OPTIMIZERS = _keras_optimizers()


def _default_sampling() -> str:
    """Poisson sampling when the library provides it (it is what the accountant proves)."""
    return "poisson" if importlib.util.find_spec("tf_autoclip.sampling") else "shuffle"


# ------------------------------------------------------------------------------------
# Flags. Defaults of None are filled in per script (see each script's docstring).
# ------------------------------------------------------------------------------------
flags.DEFINE_enum(
    "clipping", "auto-s", ["auto-s", "auto-v", "abadi", "global"],
    "Per-example clipping: automatic (auto-s, auto-v; no threshold) or Abadi's (needs R).",
)  # fmt: skip
flags.DEFINE_float("l2_norm_clip", None, "Clipping threshold R for --clipping=abadi.")
flags.DEFINE_float("gamma", None, "Stability constant of auto-s (library default 0.01).")
flags.DEFINE_enum(
    "optimizer", None, sorted(OPTIMIZERS),
    "Base optimizer (lower-case Keras name); trains with tf_autoclip.DPAuto<Name>.",
)  # fmt: skip
flags.DEFINE_float("learning_rate", None, "Learning rate (default: per script).")
flags.DEFINE_float("momentum", None, "Momentum, for optimizers that take one (sgd, rmsprop).")
flags.DEFINE_float("weight_decay", None, "Decoupled weight decay (any Keras optimizer).")
flags.DEFINE_integer("batch_size", None, "Expected (Poisson) or fixed (shuffle) batch size.")
flags.DEFINE_integer("epochs", None, "Epochs (Poisson: steps = ceil(epochs * n / batch)).")
flags.DEFINE_float("target_epsilon", 3.0, "epsilon to calibrate sigma for (RDP accountant).")
flags.DEFINE_float(
    "noise_multiplier", None, "sigma, given directly instead of from --target_epsilon."
)
flags.DEFINE_float("delta", 1e-5, "delta of the (epsilon, delta) guarantee.")
flags.DEFINE_enum("accountant", "rdp", ["rdp", "pld"], "Privacy accountant.")
flags.DEFINE_enum(
    "sampling", _default_sampling(), ["poisson", "shuffle"],
    "poisson: Poisson-sampled padded batches (the accountant's assumption, so epsilon is "
    "proven); shuffle: shuffled fixed-size batches (the Poisson epsilon is then a "
    "heuristic; the privacy statement also gives a conservative bound).",
)  # fmt: skip
flags.DEFINE_integer(
    "seed", None,
    "Seed for initialization, noise and sampling, for reproducible experiments. Default: "
    "fresh randomness. The noise and sampling seeds must stay secret for the DP guarantee.",
)  # fmt: skip
flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
flags.DEFINE_string(
    "data_dir", None,
    f"Folder with a local copy of the data (also ${DATA_DIR_ENV}). Default: "
    "tensorflow_datasets.",
)  # fmt: skip
flags.DEFINE_string("output_json", None, "Write the results (and flags, history) here.")
flags.DEFINE_bool("non_private", False, "Non-private baseline: no clipping, no noise.")
flags.DEFINE_integer("max_train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer("max_test_examples", None, "Use only the first N test examples.")

FLAGS = flags.FLAGS
COMMON_FLAGS = (
    "clipping", "l2_norm_clip", "gamma", "optimizer", "learning_rate", "momentum",
    "weight_decay", "batch_size", "epochs", "target_epsilon", "noise_multiplier", "delta",
    "accountant", "sampling", "seed", "jit_compile", "data_dir", "output_json", "non_private",
    "max_train_examples", "max_test_examples",
)  # fmt: skip


@dataclasses.dataclass
class Config:
    """The resolved settings of one run: the flags, with the script's defaults filled in."""

    clipping: str = "auto-s"
    l2_norm_clip: float | None = None
    gamma: float | None = None
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int = 256
    epochs: int = 1
    target_epsilon: float | None = 3.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    sampling: str = "poisson"
    seed: int | None = None
    jit_compile: bool = False
    data_dir: str | None = None
    output_json: str | None = None
    non_private: bool = False
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # script-specific flags

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("extra"))
        return out


def resolve_config(defaults: dict[str, Any], script_flags: tuple[str, ...] = ()) -> Config:
    """The parsed flags with ``defaults`` filled in where a flag was left at None.

    Also resolves ``--data_dir`` from ``$TF_AUTOCLIP_DATA_DIR`` and checks that the
    privacy flags do not contradict each other.
    """
    values = {name: FLAGS[name].value for name in COMMON_FLAGS}
    for name, value in defaults.items():
        if name in values and values[name] is None:
            values[name] = value
    if values["data_dir"] is None:
        values["data_dir"] = os.environ.get(DATA_DIR_ENV) or None
    if FLAGS["noise_multiplier"].present and FLAGS["target_epsilon"].present:
        raise app.UsageError("Give --target_epsilon or --noise_multiplier, not both.")
    if values["non_private"]:
        for name in ("noise_multiplier", "l2_norm_clip", "gamma"):
            if FLAGS[name].present:
                raise app.UsageError(f"--{name} has no meaning with --non_private.")
        values.update(target_epsilon=None, noise_multiplier=None)
    elif values["noise_multiplier"] is not None:
        values["target_epsilon"] = None
    clipping = values["clipping"]
    if not values["non_private"] and clipping in ("abadi", "global"):
        if values["l2_norm_clip"] is None:
            raise app.UsageError(f"--clipping={clipping} needs --l2_norm_clip (R).")
    elif not values["non_private"] and FLAGS["l2_norm_clip"].present:
        raise app.UsageError(
            "--l2_norm_clip is the threshold of --clipping=abadi; automatic clipping has none."
        )
    extra = {name: FLAGS[name].value for name in script_flags}
    return Config(**values, extra=extra)


def run(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)``, turning a missing data set into one clear message (exit code 1)."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)  # its return value (the record) is for tests, not the exit code
        except DataNotFoundError as e:
            sys.exit(f"ERROR: {e}")

    app.run(guarded)


# ------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------
class DataNotFoundError(FileNotFoundError):
    """A data set is neither available through tensorflow_datasets nor in --data_dir."""


_LOCAL_LAYOUT = {
    "mnist": "mnist.npz (Keras layout: x_train uint8 (n, 28, 28), y_train, x_test, y_test)",
    "fashion_mnist": "fashion_mnist.npz (same layout as mnist.npz)",
    "glue/sst2": (
        "sst2/train.tsv (header 'label<TAB>sentence') and sst2/dev.tsv (header "
        "'label<TAB>content' or 'label<TAB>sentence')"
    ),
}


def _missing(name: str, why: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"The {name} data set is not available ({why}). Provide it in one of two ways: "
        f"(1) tensorflow_datasets: tfds.load({name!r}) downloads it on first use (needs "
        "internet), or finds an already prepared copy under $TFDS_DATA_DIR or "
        f"~/tensorflow_datasets; or (2) a local copy: --data_dir=DIR or {DATA_DIR_ENV}=DIR "
        f"with DIR/{_LOCAL_LAYOUT[name]}."
    )


def _tfds_arrays(name: str, split: str, keys: tuple[str, ...]) -> list[np.ndarray]:
    """Whole split as numpy arrays (iterating in chunks; works with tfds' mock_data too)."""
    try:
        import tensorflow_datasets as tfds

        dataset = tfds.load(name, split=split)
        chunks = [tfds.as_numpy(b) for b in dataset.batch(8192)]
    except Exception as e:  # noqa: BLE001 - any download/preparation failure
        raise _missing(name, f"tensorflow_datasets failed: {type(e).__name__}: {e}") from e
    return [np.concatenate([c[k] for c in chunks]) for k in keys]


def _cap(arrays: list[np.ndarray], limit: int | None) -> list[np.ndarray]:
    return arrays if limit is None else [a[:limit] for a in arrays]


def load_images(name: str, config: Config) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of mnist / fashion_mnist.

    Images are float32 of shape (n, 28, 28, 1) scaled to [0, 1] (pixel / 255); labels
    int32.
    """
    if config.data_dir:
        path = os.path.join(config.data_dir, f"{name}.npz")
        if not os.path.exists(path):
            raise _missing(name, f"{path} does not exist")
        with np.load(path) as data:
            train = [data["x_train"], data["y_train"]]
            test = [data["x_test"], data["y_test"]]
    else:
        train = _tfds_arrays(name, "train", ("image", "label"))
        test = _tfds_arrays(name, "test", ("image", "label"))
    train, test = _cap(train, config.max_train_examples), _cap(test, config.max_test_examples)

    def images(x: np.ndarray) -> np.ndarray:
        return (x.reshape(-1, 28, 28, 1) / np.float32(255.0)).astype(np.float32)

    return images(train[0]), train[1].astype(np.int32), images(test[0]), test[1].astype(np.int32)


def _read_tsv(path: str) -> tuple[np.ndarray, np.ndarray]:
    labels, texts = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if len(header) != 2 or header[0] != "label":
            raise ValueError(f"{path}: expected a header 'label<TAB>text', got {header}.")
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            labels.append(int(label))
            texts.append(text)
    return np.array(texts, dtype=object), np.array(labels, dtype=np.int32)


def load_sst2(config: Config) -> tuple[np.ndarray, ...]:
    """(train_text, y_train, test_text, y_test) of GLUE SST-2; test = the validation set."""
    if config.data_dir:
        paths = [os.path.join(config.data_dir, "sst2", f) for f in ("train.tsv", "dev.tsv")]
        for path in paths:
            if not os.path.exists(path):
                raise _missing("glue/sst2", f"{path} does not exist")
        train, test = (list(_read_tsv(p)) for p in paths)
    else:
        train = _tfds_arrays("glue/sst2", "train", ("sentence", "label"))
        test = _tfds_arrays("glue/sst2", "validation", ("sentence", "label"))
        train[0], test[0] = (
            np.array([s.decode("utf-8") for s in t[0]], object) for t in (train, test)
        )
    train, test = _cap(train, config.max_train_examples), _cap(test, config.max_test_examples)
    return train[0], train[1].astype(np.int32), test[0], test[1].astype(np.int32)


# ------------------------------------------------------------------------------------
# Training plumbing (plain Keras; the private parts are in the scripts).
# ------------------------------------------------------------------------------------
def optimizer_kwargs(config: Config) -> dict[str, Any]:
    """The base optimizer's arguments: ``--learning_rate``, ``--momentum``, ``--weight_decay``."""
    kwargs: dict[str, Any] = {"learning_rate": config.learning_rate}
    accepted = inspect.signature(OPTIMIZERS[config.optimizer].__init__).parameters
    if config.momentum is not None:
        if "momentum" not in accepted:
            raise app.UsageError(f"--optimizer={config.optimizer} takes no --momentum.")
        kwargs["momentum"] = config.momentum
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    return kwargs


def num_train_examples(data: tuple[Any, Any, Any, Any], config: Config) -> int:
    """n, the number of training examples; checks ``--batch_size`` against it."""
    n = len(data[1])
    if not 0 < config.batch_size <= n:
        raise app.UsageError(f"--batch_size must be in [1, {n}] (training examples).")
    return n


def shuffled_steps(config: Config, n: int) -> int:
    """Steps of ``--epochs`` epochs of shuffled batches (Keras keeps the last, partial one)."""
    return config.epochs * math.ceil(n / config.batch_size)


def _json_number(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def fit_and_evaluate(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    data: tuple[Any, Any, Any, Any],
    config: Config,
    *,
    start: float,
    sampler: Any = None,
    callbacks: tuple[keras.callbacks.Callback, ...] | list[keras.callbacks.Callback] = (),
    noise_multiplier: float | None = None,
    verbose: int = 2,
) -> dict[str, Any]:
    """Compiles, fits and evaluates ``model``; returns the result record (no privacy yet).

    ``data`` is ``(x_train, y_train, x_test, y_test)`` as numpy arrays; the loss is
    cross-entropy on logits, the metric accuracy (integer labels). Trains on
    ``sampler.dataset`` (a ``tf_autoclip.poisson_sample``) if given, else on shuffled
    batches of ``--batch_size`` for ``--epochs``. The record holds ``test_accuracy``,
    ``delta`` (None when non-private), ``noise_multiplier``, ``steps`` (the optimizer's
    ``iterations``), ``seconds`` (since ``start``) and the per-epoch ``history``;
    ``epsilon`` is None until ``add_privacy``.
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    x_train, y_train, x_test, y_test = data
    # weighted_metrics: Keras' plain `metrics` ignore sample_weight, so they would count the
    # zero-weight padding rows of Poisson batches. (The logged training "loss" is Keras'
    # sum over the sampled examples divided by the padded batch size.)
    model.compile(
        optimizer=optimizer, loss=loss, weighted_metrics=metrics, jit_compile=config.jit_compile
    )
    fit_args: dict[str, Any] = {
        "validation_data": (x_test, y_test),
        "callbacks": list(callbacks),
        "verbose": verbose,
    }
    if sampler is not None:
        # The sampler yields exactly `sampler.steps` batches (the steps sigma is calibrated
        # for); when that is not a multiple of steps_per_epoch the last epoch is shorter, and
        # Keras warns that the input "ran out of data". That is intended here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            history = model.fit(
                sampler.dataset, epochs=sampler.epochs, steps_per_epoch=sampler.steps_per_epoch,
                shuffle=False, **fit_args,
            )  # fmt: skip
    else:
        history = model.fit(
            x_train, y_train, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
            **fit_args,
        )  # fmt: skip
    train_seconds = time.time() - start
    scores = model.evaluate(x_test, y_test, batch_size=1024, verbose=0, return_dict=True)

    return {
        "test_accuracy": float(scores["accuracy"]),
        "test_loss": float(scores["loss"]),
        "epsilon": None,
        "delta": None if config.non_private else config.delta,
        "noise_multiplier": noise_multiplier,
        "steps": int(keras.ops.convert_to_numpy(optimizer.iterations)),
        "epochs_run": len(history.epoch),
        "num_train_examples": len(y_train),
        "num_test_examples": len(y_test),
        "sampling": "shuffle" if sampler is None else "poisson",
        "train_seconds": train_seconds,
        "seconds": time.time() - start,
        "history": {
            "epoch": [e + 1 for e in history.epoch],
            **{k: [_json_number(v) for v in vs] for k, vs in history.history.items()},
        },
    }


def train_non_private(
    build_model: Callable[[], keras.Model],
    data: tuple[Any, Any, Any, Any],
    config: Config,
    verbose: int = 2,
) -> dict[str, Any]:
    """The ``--non_private`` baseline: the base Keras optimizer, no clipping, no noise."""
    start = time.time()
    num_train_examples(data, config)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    optimizer = OPTIMIZERS[config.optimizer](**optimizer_kwargs(config))
    record = fit_and_evaluate(build_model(), optimizer, data, config, start=start, verbose=verbose)
    record["privacy_statement"] = "Non-private baseline: no differential privacy guarantee."
    return record


def add_privacy(
    record: dict[str, Any],
    *,
    planned_steps: int,
    epsilon: float,
    epsilon_shuffle_bound: float,
    sampling_probability: float,
    overflow_probability: float,
    privacy_statement: str,
) -> dict[str, Any]:
    """Adds a private run's guarantee to its ``record`` (returned).

    ``epsilon_proven`` is true for Poisson-sampled batches (the accountant's assumption).
    Reports when the ``PrivacyCallback`` stopped training before ``planned_steps``.
    """
    steps = record["steps"]
    if steps < planned_steps:
        print(f"PrivacyCallback stopped training after {steps} of {planned_steps} steps.")
    record.update(
        stopped_by_privacy_budget=steps < planned_steps,
        epsilon_proven=record["sampling"] == "poisson",
        epsilon=_json_number(epsilon),
        epsilon_shuffle_bound=_json_number(epsilon_shuffle_bound),
        sampling_probability=sampling_probability,
        overflow_probability=overflow_probability,
        privacy_statement=privacy_statement,
    )
    return record


# ------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------
def finish(
    record: dict[str, Any], config: Config, start: float, notes: tuple[str, ...] = ()
) -> None:
    """Prints the privacy statement and the final line; writes ``--output_json``.

    ``seconds`` becomes the wall time since ``start`` (data loading included).
    """
    record["seconds"] = time.time() - start
    record["code_version"] = code_version()
    statement = "\n".join([record["privacy_statement"], *notes])
    record = {**record, "privacy_statement": statement, "flags": config.to_dict()}
    print("\n" + statement)
    if config.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(config.output_json)), exist_ok=True)
        with open(config.output_json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"Wrote {config.output_json}")
    print(final_line(record))


def code_version() -> str | None:
    """The checkout's commit (``+dirty`` if tf_autoclip/ or examples/ differ from it), or
    None outside a git checkout: which code produced a result file."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "tf_autoclip", "examples")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def final_line(record: dict[str, Any]) -> str:
    accuracy = f"test_accuracy={record['test_accuracy']:.4f}"
    if record["epsilon"] is None:
        return f"FINAL {accuracy} epsilon=inf (non-private baseline, no DP guarantee)"
    kind = "Poisson sampling" if record["epsilon_proven"] else "shuffled batches, heuristic"
    return (
        f"FINAL {accuracy} epsilon={float(record['epsilon']):.4g} delta={record['delta']:.3g} "
        f"sigma={record['noise_multiplier']:.4g} steps={record['steps']} ({kind})"
    )
