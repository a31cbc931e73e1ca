r"""DP fine-tuning of a KerasHub text classifier (BERT by default) on GLUE SST-2.

DP-AdamW with automatic clipping (``--clipping=auto-s``), full fine-tuning or LoRA
(``--lora_rank=N``: ``backbone.enable_lora(N)``, only the low-rank factors and the
classification head train). Compare ``--target_epsilon=3``, ``--target_epsilon=8`` and the
non-private baseline ``--non_private`` (same model, same number of steps).

Model:

* ``--preset=DIR``: a KerasHub preset directory on disk (``keras_hub.models.TextClassifier
  .from_preset(DIR, num_classes=2)``: pretrained weights, with the preset's own tokenizer and
  ``--sequence_length``). Nothing is downloaded by this script: pass a preset you have already
  downloaded (e.g. the folder ``kagglehub`` put ``bert_tiny_en_uncased`` in). ``--model``
  and the size flags are ignored then.
* no ``--preset``: **no pretrained weights: random init**. A small ``--model`` backbone
  (``bert``, ``roberta`` or ``distil_bert``) of ``--backbone_layers`` x ``--hidden_dim`` built
  from the flags, on **bytes**: ``keras_hub.tokenizers.ByteTokenizer`` (UTF-8 bytes, no
  vocabulary), shifted by 3 to make room for padding (0), start (1) and end (2) tokens.
  A random-init model on 67k short sentences is a weak sentiment classifier with or without
  DP; this mode shows the machinery, not what fine-tuning a pretrained model reaches.

**Tokenizer and privacy.** Neither tokenizer is computed from the training data (the
byte tokenizer has no vocabulary; a preset's vocabulary comes with the preset, from its
public pre-training data), so apart from the model's architecture and the flags nothing
that touches the training sentences escapes the DP guarantee. (Contrast
``sst2_transformer.py``, whose word vocabulary is fitted on the training sentences.) A
preset's pre-training data are assumed public: the guarantee covers the SST-2 training
sentences only.

Defaults: DP-AdamW, batch 256 (expected, Poisson), 3 epochs, target epsilon 3 at delta 1e-5.
Random init: lr 1e-3, ``--gamma=1`` (as ``sst2_transformer.py``: with AUTO-S's 0.01 a model
trained from scratch drifts toward the class prior). With ``--preset``: lr 5e-4 and the
library's gamma = 0.01 (the AUTO-S paper's setting for fine-tuning). Measured results:
docs/results.md.

The library's calls are in ``train_and_evaluate`` below; flags, data loading, the Keras
fit and the results are the examples' shared plumbing in ``common.py``.

Examples:
  python examples/finetune_kerashub.py --data_dir=DATA --max_train_examples=20000
  python examples/finetune_kerashub.py --data_dir=DATA --lora_rank=4 --preset=/path/to/preset
  python examples/finetune_kerashub.py --data_dir=DATA --non_private
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac

if __package__:  # imported as examples.finetune_kerashub (tests, python -m)
    from examples import common
else:  # python examples/finetune_kerashub.py: this script's folder is on sys.path
    import common

try:
    import keras_hub
except ImportError as error:  # an optional dependency of this example only
    raise SystemExit(f"This example needs keras-hub: pip install keras-hub ({error})") from None

MODELS = {  # --model: (backbone, task) classes for random init
    "bert": ("BertBackbone", "BertTextClassifier"),
    "roberta": ("RobertaBackbone", "RobertaTextClassifier"),
    "distil_bert": ("DistilBertBackbone", "DistilBertTextClassifier"),
}
flags.DEFINE_string(
    "preset", None,
    "A KerasHub preset directory on disk (pretrained weights and tokenizer). Default: "
    "random init of --model (no pretrained weights).",
)  # fmt: skip
flags.DEFINE_enum("model", "bert", sorted(MODELS), "Architecture for random init (no --preset).")
flags.DEFINE_integer("lora_rank", 0, "LoRA rank (backbone.enable_lora); 0: full fine-tuning.")
flags.DEFINE_integer("sequence_length", 128, "Tokens per sentence incl. start/end (cut beyond).")
flags.DEFINE_integer("backbone_layers", 2, "Random init: Transformer layers.")
flags.DEFINE_integer("hidden_dim", 128, "Random init: model width.")
flags.DEFINE_integer("backbone_heads", 2, "Random init: attention heads.")
flags.DEFINE_integer("intermediate_dim", 512, "Random init: feed-forward width.")
flags.DEFINE_float("dropout", 0.1, "Dropout of the backbone and the classification head.")

flags.adopt_module_key_flags(common)  # the common flags show in --help
FLAGS = flags.FLAGS
SCRIPT_FLAGS = (
    "preset", "model", "lora_rank", "sequence_length", "backbone_layers", "backbone_heads",
    "hidden_dim", "intermediate_dim", "dropout",
)  # fmt: skip
DEFAULTS = {
    "optimizer": "adamw",
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "batch_size": 256,
    "epochs": 3,
    "gamma": 1.0,  # random init: see the module docstring
}
PRESET_DEFAULTS = {**DEFAULTS, "learning_rate": 5e-4, "gamma": 0.01}
PAD, START, END, BYTE_OFFSET = 0, 1, 2, 3  # byte tokens: id = byte + 3
RANDOM_INIT_NOTE = (
    "Model: no pretrained weights: random init ({model}, {params:,} parameters), "
    "byte-level tokens (no vocabulary computed from the data)."
)
PRESET_NOTE = (
    "Model: pretrained preset {preset} ({params:,} parameters) and its tokenizer; the "
    "pre-training data are assumed public (the guarantee covers the SST-2 training set)."
)


def byte_features(text: np.ndarray, sequence_length: int) -> dict[str, np.ndarray]:
    """``token_ids`` (start, UTF-8 bytes + 3, end, then 0-padding) and ``padding_mask``."""
    tokenizer = keras_hub.tokenizers.ByteTokenizer()
    packer = keras_hub.layers.StartEndPacker(
        sequence_length=sequence_length, start_value=START, end_value=END, pad_value=PAD,
        return_padding_mask=True,
    )  # fmt: skip

    def pack(text):
        token_ids, padding_mask = packer(tokenizer(text) + BYTE_OFFSET)
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    return _features(pack, text)


def _features(fn, text: np.ndarray) -> dict[str, np.ndarray]:
    """``fn`` (strings -> dict of tensors) over ``text`` in tf.data batches, as numpy."""
    dataset = tf.data.Dataset.from_tensor_slices(list(text)).batch(4096).map(fn)
    chunks = [{k: np.asarray(v) for k, v in batch.items()} for batch in dataset]
    return {k: np.concatenate([c[k] for c in chunks]).astype(np.int32) for k in chunks[0]}


def preset_features(preprocessor, text: np.ndarray) -> dict[str, np.ndarray]:
    """The preset preprocessor's inputs (token_ids, padding_mask, ...) as numpy arrays."""
    return _features(preprocessor, text)


def random_init_classifier() -> keras.Model:
    """A KerasHub text classifier of ``--model`` built from the size flags (no weights)."""
    backbone_class, task_class = (getattr(keras_hub.models, c) for c in MODELS[FLAGS.model])
    backbone = backbone_class(
        vocabulary_size=256 + BYTE_OFFSET, num_layers=FLAGS.backbone_layers,
        num_heads=FLAGS.backbone_heads, hidden_dim=FLAGS.hidden_dim,
        intermediate_dim=FLAGS.intermediate_dim, max_sequence_length=FLAGS.sequence_length,
        dropout=FLAGS.dropout,
    )  # fmt: skip
    return task_class(backbone, num_classes=2, preprocessor=None, dropout=FLAGS.dropout)


def with_inputs(x: dict[str, np.ndarray], model: keras.Model) -> dict[str, np.ndarray]:
    """``x`` restricted to (or completed with zero ``segment_ids`` for) the model's inputs."""
    names = [i.name for i in model.inputs]
    return {k: x[k] if k in x else np.zeros_like(x["token_ids"]) for k in names}


def train_and_evaluate(
    build: Callable[[], keras.Model], data: tuple, config: common.Config, verbose: int = 2
) -> dict:
    """Trains ``build()`` with DP-AdamW (by default) as ``config`` says; returns the record.

    ``data`` is ``(x_train, y_train, x_test, y_test)``, the inputs dicts of token ids and
    padding masks. ``--non_private`` trains the plain Keras baseline instead
    (``common.train_non_private``).
    """
    if config.non_private:
        return common.train_non_private(build, data, config, verbose=verbose)
    start = time.time()
    x_train, y_train, _, _ = data
    n = common.num_train_examples(data, config)  # also checks --batch_size
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)

    # Batches: Poisson sampling (the accountant's assumption), or shuffled batches.
    sampler = None
    if config.sampling == "poisson":
        sampler = ac.poisson_sample(
            x_train, y_train, expected_batch_size=config.batch_size, epochs=config.epochs,
            seed=config.seed,
        )  # fmt: skip
        planned_steps = sampler.steps
    else:
        planned_steps = common.shuffled_steps(config, n)

    # sigma: --noise_multiplier, or the one reaching --target_epsilon after planned_steps.
    q = config.batch_size / n
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = ac.compute_noise_multiplier(
            config.target_epsilon, config.delta, q, steps=planned_steps,
            accountant=config.accountant,
        )  # fmt: skip

    # The DP optimizer: ac.DPAutoAdamW by default (--optimizer=NAME: ac.DPAuto<Name>).
    dp_optimizer_class = getattr(ac, "DPAuto" + common.OPTIMIZERS[config.optimizer].__name__)
    optimizer = dp_optimizer_class(
        **common.optimizer_kwargs(config),  # learning_rate, momentum, weight_decay
        noise_multiplier=sigma,
        clipping=config.clipping,
        gamma=config.gamma,
        l2_norm_clip=config.l2_norm_clip if config.clipping in ("abadi", "global") else None,
        expected_batch_size=config.batch_size,
        seed=config.seed,
    )

    # The KerasHub classifier (LoRA already enabled by build()), made private: per-example
    # gradients of the trainable weights, clipped (engine "auto": book-keeping for BERT).
    model = ac.make_private(build())
    engine = ac.engines.auto_engine_name(model, None)

    # Tracks epsilon per epoch (history["epsilon"]) and stops at --target_epsilon.
    privacy = ac.PrivacyCallback(
        num_examples=n,
        delta=config.delta,
        target_epsilon=config.target_epsilon,
        accountant=config.accountant,
        sampling="poisson",  # the accounting sigma is calibrated with
        batch_size=config.batch_size,
        verbose=0,  # an early stop is reported in the record instead
    )
    record = common.fit_and_evaluate(
        model, optimizer, data, config, start=start, sampler=sampler, callbacks=[privacy],
        noise_multiplier=sigma, verbose=verbose,
    )  # fmt: skip
    record["engine"] = engine

    # The guarantee of the steps actually run.
    steps = record["steps"]
    epsilon = ac.compute_epsilon(sigma, q, steps, config.delta, config.accountant)
    overflow = 0.0 if sampler is None else sampler.overflow_probability
    statement = ac.privacy_statement(
        sigma, q, steps, config.delta, num_examples=n, batch_size=config.batch_size,
        accountant=config.accountant, overflow_probability=overflow,
    )  # fmt: skip
    # A bound for batches in any order (shuffled ones): one full-batch step per pass.
    passes = math.ceil(steps / ac.accounting.steps_per_pass(n, config.batch_size))
    return common.add_privacy(
        record,
        planned_steps=planned_steps,
        epsilon=epsilon,
        epsilon_shuffle_bound=ac.compute_epsilon(
            sigma, 1.0, passes, config.delta, config.accountant
        ),
        sampling_probability=q,
        overflow_probability=overflow,
        privacy_statement=statement,
    )


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.lora_rank < 0:
        raise app.UsageError("--lora_rank must be >= 0 (0: full fine-tuning).")
    start = time.time()
    config = common.resolve_config(
        PRESET_DEFAULTS if FLAGS.preset else DEFAULTS, script_flags=SCRIPT_FLAGS
    )
    train_text, y_train, test_text, y_test = common.load_sst2(config)

    if FLAGS.preset:  # pretrained: the preset's tokenizer, weights loaded in build()
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
            FLAGS.preset, sequence_length=FLAGS.sequence_length
        )
        x_train, x_test = (preset_features(preprocessor, t) for t in (train_text, test_text))
    else:  # random init: bytes
        x_train, x_test = (byte_features(t, FLAGS.sequence_length) for t in (train_text, test_text))

    def build() -> keras.Model:
        if FLAGS.preset:
            model = keras_hub.models.TextClassifier.from_preset(
                FLAGS.preset, num_classes=2, preprocessor=None, dropout=FLAGS.dropout
            )
        else:
            model = random_init_classifier()
        if FLAGS.lora_rank:
            model.backbone.enable_lora(FLAGS.lora_rank)  # freezes the rest of the backbone
        return model

    probe = build()  # the input names and sizes (a fresh model is built for training)
    x_train, x_test = with_inputs(x_train, probe), with_inputs(x_test, probe)
    params = probe.count_params()
    trainable = sum(math.prod(v.shape) for v in probe.trainable_variables)
    del probe
    record = train_and_evaluate(build, (x_train, y_train, x_test, y_test), config)
    record.update(
        dataset="glue/sst2",
        model=FLAGS.preset or f"{FLAGS.model} (random init)",
        pretrained=bool(FLAGS.preset),
        parameters=params,
        trainable_parameters=trainable,
        test_sentences_truncated=float(np.mean(x_test["padding_mask"][:, -1] == 1)),
    )
    note = (
        PRESET_NOTE.format(preset=FLAGS.preset, params=params)
        if FLAGS.preset
        else RANDOM_INIT_NOTE.format(model=FLAGS.model, params=params)
    )
    if FLAGS.lora_rank:
        note += f" LoRA rank {FLAGS.lora_rank}: {trainable:,} trainable parameters."
    common.finish(record, config, start, notes=(note,))
    return record


if __name__ == "__main__":
    common.run(main)
