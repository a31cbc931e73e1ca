r"""DP sentiment classification on GLUE SST-2 with a small Transformer trained from scratch.

DP-AdamW with automatic clipping (``--clipping=auto-s``); compare ``--target_epsilon=3``,
``--target_epsilon=8`` and the non-private baseline ``--non_private``.

Model: token + learned position embeddings (``--embed_dim``), ``--num_layers`` post-norm
Transformer encoder blocks (multi-head self-attention with a padding mask, a GELU
feed-forward of ``--ff_dim``, LayerNormalization: no BatchNormalization, which mixes
examples), masked mean pooling and a 2-way linear head. With the defaults it has about
0.27 M parameters; a DP epoch over the 67,349 training sentences took 42 s to 94 s on
2 busy CPU cores, a whole default run about 5.5 minutes.

Defaults: DP-AdamW, lr 1e-3, weight decay 0.01, batch 1024 (expected, Poisson), 5 epochs,
target epsilon 3 at delta 1e-5, and ``--gamma=1`` for AUTO-S instead of the library's
0.01. Why: AUTO-S weighs example i by ``1 / (||g_i|| + gamma)``, so an example keeps
pushing with (almost) unit norm until its gradient norm is below gamma, i.e. until it
is fitted with near certainty. For a model trained from scratch, whose sentiment
features emerge slowly under the noise, the strongest common direction at first is the
class prior (55.8% of the training sentences are positive): with gamma = 0.01 the
model drifted into predicting "positive" for every sentence with growing confidence
(50.9% validation accuracy at epsilon = 8 with ``--seed=1``, validation loss 2.2),
while gamma = 1 lets well-fitted examples fade out as ordinary gradients do (62.4%
with the same seed at lr 5e-4 after 3 epochs, 76.5% at lr 1e-3 after 5 epochs).
Measured accuracies with the defaults: 73.5% (epsilon 3), 73.2% (epsilon 8); see
docs/results.md.

**Vocabulary and privacy.** The tokens are the ``--vocab_size`` most frequent words of
the training sentences (``keras.layers.TextVectorization.adapt`` on the training text
only; the validation set, used as the test set, is never looked at). This vocabulary
is computed from the private training data *without noise*: it is NOT covered by the DP
guarantee, and the privacy statement printed at the end says so. A deployment that
needs the guarantee to cover everything must build the vocabulary from public text (or
with a DP frequency release) instead.

The library's calls are in ``train_and_evaluate`` below; flags, data loading, the Keras
fit and the results are the examples' shared plumbing in ``common.py``.

Examples:
  python examples/sst2_transformer.py --data_dir=DATA --target_epsilon=3
  python examples/sst2_transformer.py --data_dir=DATA --target_epsilon=8
  python examples/sst2_transformer.py --data_dir=DATA --non_private
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras
import numpy as np
from absl import app, flags

import tf_autoclip as ac

if __package__:  # imported as examples.sst2_transformer (tests, python -m)
    from examples import common
else:  # python examples/sst2_transformer.py: this script's folder is on sys.path
    import common

flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size (incl. padding and OOV tokens).")
flags.DEFINE_integer("max_length", 48, "Tokens per sentence (longer ones are cut).")
flags.DEFINE_integer("embed_dim", 32, "Embedding / model width.")
flags.DEFINE_integer("num_heads", 2, "Attention heads.")
flags.DEFINE_integer("ff_dim", 64, "Feed-forward width.")
flags.DEFINE_integer("num_layers", 1, "Transformer encoder blocks.")

flags.adopt_module_key_flags(common)  # the common flags show in --help
FLAGS = flags.FLAGS
SCRIPT_FLAGS = ("vocab_size", "max_length", "embed_dim", "num_heads", "ff_dim", "num_layers")
DEFAULTS = {
    "optimizer": "adamw",
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "batch_size": 1024,
    "epochs": 5,
    "gamma": 1.0,  # see the module docstring
}
VOCABULARY_NOTE = (
    "Vocabulary: the {size} most frequent tokens of the training sentences "
    "(TextVectorization.adapt, no noise). It is data-dependent and NOT covered by the DP "
    "guarantee above."
)


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of the position to each token vector."""

    def __init__(self, max_length: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(self.max_length, input_shape[-1]), initializer="uniform", name="positions"
        )

    def call(self, x):
        return x + self.positions[None, : keras.ops.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def build_model(
    vocab_size: int, max_length: int, embed_dim: int, num_heads: int, ff_dim: int, num_layers: int
) -> keras.Model:
    """Token ids (0 = padding) -> 2 logits."""
    layers = keras.layers
    tokens = keras.Input((max_length,), dtype="int32", name="tokens")
    mask = keras.ops.cast(keras.ops.not_equal(tokens, 0), "float32")  # [B, L]
    x = layers.Embedding(vocab_size, embed_dim, name="token_embedding")(tokens)
    x = PositionEmbedding(max_length, name="position_embedding")(x)
    attention_mask = keras.ops.expand_dims(mask, 1)  # [B, 1, L]: attend to real tokens only
    for i in range(num_layers):
        attended = layers.MultiHeadAttention(
            num_heads, key_dim=embed_dim // num_heads, name=f"attention_{i}"
        )(x, x, attention_mask=attention_mask)
        x = layers.LayerNormalization(name=f"norm_{i}a")(x + attended)
        hidden = layers.Dense(ff_dim, activation="gelu", name=f"ff_{i}a")(x)
        x = layers.LayerNormalization(name=f"norm_{i}b")(x + layers.Dense(embed_dim)(hidden))
    weights = keras.ops.expand_dims(mask, -1)
    pooled = keras.ops.sum(x * weights, axis=1) / keras.ops.maximum(
        keras.ops.sum(weights, axis=1), 1.0
    )
    # Zero-initialized head: the untrained model predicts 50/50 instead of a random,
    # confident class (which noisy DP updates are slow to undo).
    logits = layers.Dense(2, kernel_initializer="zeros", name="logits")(pooled)
    return keras.Model(tokens, logits, name="sst2_transformer")


def vectorize(train_text, test_text, vocab_size: int, max_length: int):
    """Token ids of both splits, with the vocabulary fitted on the training text only."""
    vectorizer = keras.layers.TextVectorization(
        max_tokens=vocab_size, output_sequence_length=max_length
    )
    vectorizer.adapt(list(train_text), batch_size=4096)

    def ids(text):
        return np.asarray(vectorizer(np.asarray(list(text), dtype=object)), dtype=np.int32)

    return ids(train_text), ids(test_text), vectorizer.vocabulary_size()


def train_and_evaluate(
    build: Callable[[], keras.Model], data: tuple, config: common.Config, verbose: int = 2
) -> dict:
    """Trains ``build()`` with DP-AdamW (by default) as ``config`` says; returns the record.

    ``data`` is ``(x_train, y_train, x_test, y_test)`` (token ids). ``--non_private``
    trains the plain Keras baseline instead (``common.train_non_private``).
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
        gamma=config.gamma,  # 1.0 here for AUTO-S: see the module docstring
        l2_norm_clip=config.l2_norm_clip if config.clipping in ("abadi", "global") else None,
        expected_batch_size=config.batch_size,
        seed=config.seed,
    )

    # The Transformer, made private (per-example gradients, clipped).
    model = ac.make_private(build())

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

    # The guarantee of the steps actually run (the vocabulary note is added by main).
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
    start = time.time()
    config = common.resolve_config(DEFAULTS, script_flags=SCRIPT_FLAGS)
    train_text, y_train, test_text, y_test = common.load_sst2(config)
    x_train, x_test, vocab = vectorize(train_text, test_text, FLAGS.vocab_size, FLAGS.max_length)

    def model_fn() -> keras.Model:
        return build_model(
            vocab, FLAGS.max_length, FLAGS.embed_dim, FLAGS.num_heads, FLAGS.ff_dim,
            FLAGS.num_layers,
        )  # fmt: skip

    record = train_and_evaluate(model_fn, (x_train, y_train, x_test, y_test), config)
    record.update(dataset="glue/sst2", vocabulary_size=vocab, vocabulary_is_private=False)
    notes = () if config.non_private else (VOCABULARY_NOTE.format(size=vocab),)
    common.finish(record, config, start, notes=notes)
    return record


if __name__ == "__main__":
    common.run(main)
