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

Examples:
  python examples/sst2_transformer.py --data_dir=DATA --target_epsilon=3
  python examples/sst2_transformer.py --data_dir=DATA --target_epsilon=8
  python examples/sst2_transformer.py --data_dir=DATA --non_private
"""

from __future__ import annotations

import os
import sys
import time

import keras
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

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

    record = common.train_and_evaluate(model_fn, (x_train, y_train, x_test, y_test), config)
    record.update(dataset="glue/sst2", vocabulary_size=vocab, vocabulary_is_private=False)
    notes = () if config.non_private else (VOCABULARY_NOTE.format(size=vocab),)
    common.finish(record, config, start, notes=notes)
    return record


if __name__ == "__main__":
    common.run(main)
