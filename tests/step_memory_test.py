"""What the DP step's graph holds in memory for as long as it exists.

Grappler folds ops whose output it can compute at optimization time into constants; with
static shapes (Keras' datasets usually give them) ``tf.zeros_like(t)`` becomes a constant
as large as ``t``, which the runtime materializes when it builds the step and keeps for
the step's lifetime: one activation-sized tensor per layer before this was fixed (W3 with
``low_memory``: 32 MB in use at the step's start, ``benchmarks/memory_profile.py``). The
check runs grappler on the traced step, as the runtime does, and looks at every constant
of the optimized graph and of its functions (the ``tf.cond`` branches).

And the normalization rules save their layer's input and its per-example statistics, not
a normalized copy of the input (an activation-sized tensor per layer, alive from the
forward pass to the norms: W3, nine ``[32, 128, 256]``, 36 MB).
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
from tensorflow.python.grappler import tf_optimizer

import tf_autoclip as ac
from tests import reference, testing_models
from tf_autoclip import rules as layer_rules
from tf_autoclip.rules import numerics

BATCH = 61  # a prime no other axis equals


def folded_constants(concrete: tf.types.experimental.ConcreteFunction) -> list[tuple[int, str]]:
    """``(elements, name, shape)`` of every constant in ``concrete``'s graph after
    grappler's default optimizations, largest first."""
    meta = meta_graph_pb2.MetaGraphDef()
    meta.graph_def.CopyFrom(concrete.graph.as_graph_def())
    fetches = [t.op.name for t in concrete.outputs]
    fetches += [op.name for op in concrete.graph.get_operations() if "Assign" in op.type]
    meta.collection_def["train_op"].node_list.value.extend(fetches)
    optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta)
    nodes = [*optimized.node, *(n for f in optimized.library.function for n in f.node_def)]
    found = []
    for node in nodes:
        if node.op == "Const":
            dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
            found.append((int(np.prod(dims)) if dims else 1, node.name, dims))
    return sorted(found, reverse=True)


def rows_model() -> keras.Model:
    """Dense on rows, LayerNormalization, and a Dense on one row per example."""
    inputs = keras.Input((16, 24))
    h = keras.layers.LayerNormalization()(keras.layers.Dense(32)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def frozen_by_stop_gradient() -> keras.Model:
    """A Dense layer whose variables the loss does not depend on (gradient None)."""
    inputs = keras.Input((40,))
    h = keras.ops.stop_gradient(keras.layers.Dense(50)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(h))


MODELS = {"rows": rows_model, "cnn": testing_models.cnn, "embedding": testing_models.embedding}
MODELS["unconnected"] = frozen_by_stop_gradient


class FoldedConstantsTest(tf.test.TestCase, parameterized.TestCase):
    def step(self, name: str, engine: str, low_memory: bool = False):
        keras.utils.set_random_seed(0)
        model = ac.make_private(MODELS[name](), engine=engine, low_memory=low_memory)
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.optimizer.build(model.trainable_variables)
        x, _ = testing_models.data_for(model, BATCH)
        specs = (tf.TensorSpec([BATCH, *x.shape[1:]], x.dtype), tf.TensorSpec([BATCH], tf.int32))
        return tf.function(model.train_step).get_concrete_function(specs)

    @parameterized.named_parameters(
        (f"{name}_{engine}{'_low_memory' if low else ''}", name, engine, low)
        for name in sorted(MODELS)
        for engine, low in (("bk", False), ("bk", True), ("ghost", False), ("vectorized", False))
    )
    def test_no_batch_sized_constant(self, name, engine, low_memory):
        constants = folded_constants(self.step(name, engine, low_memory))
        # More than one number per example: a folded per-example tensor.
        per_example = [c for c in constants if c[2][:1] == [BATCH] and c[0] > BATCH]
        self.assertEmpty(per_example)

    def test_the_check_finds_a_folded_zeros_like(self):
        def safe_rows(t, c):  # keep_rows as it was: zeros_like(t) in the dropped rows
            return tf.where(tf.reshape(c, [-1, 1, 1]) != 0, t, tf.zeros_like(t))

        spec = (tf.TensorSpec([BATCH, 4, 8]), tf.TensorSpec([BATCH]))
        largest = folded_constants(tf.function(safe_rows).get_concrete_function(*spec))[0]
        self.assertEqual(largest[2], [BATCH, 4, 8])
        ours = tf.function(lambda t, c: numerics.keep_rows(t, c)).get_concrete_function(*spec)
        self.assertLess(folded_constants(ours)[0][0], BATCH)


class UnconnectedVariablesTest(tf.test.TestCase, parameterized.TestCase):
    """Variables the loss does not depend on are left out of the per-example work: their
    clipped sums are 0 and every other sum is unchanged (against one tape per example)."""

    @parameterized.product(engine=["bk", "ghost", "vectorized"], style=["all-layer", "per-layer"])
    def test_sums_match_a_per_example_loop(self, engine, style):
        keras.utils.set_random_seed(3)
        model = frozen_by_stop_gradient()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(6, 40)).astype("float32")
        y = rng.integers(0, 3, size=6)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        grads = reference.unit_gradients(model, x, y, loss)
        want = reference.clipped_sum(grads, reference.groups_for(model, style))
        optimizer = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, clipping_style=style)
        got = ac.private_gradients(model, x, y, optimizer=optimizer, loss=loss, engine=engine)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(np.asarray(g) * len(y), w, rtol=1e-5, atol=1e-6)
        self.assertAllEqual(got[0], np.zeros_like(got[0]))  # the frozen kernel


class NormalizationSavesTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("layer", lambda: keras.layers.LayerNormalization()),
        ("rms_scaling", lambda: keras.layers.LayerNormalization(rms_scaling=True)),
        ("group", lambda: keras.layers.GroupNormalization(groups=2)),
        ("rms", lambda: keras.layers.RMSNormalization()),
    )
    def test_saves_the_input_and_small_statistics(self, make_layer):
        layer = make_layer()
        layer.build((None, 5, 8))
        rule = layer_rules.get_layer_rule(layer)

        def forward(x):
            record = layer_rules.Record(layer, rule, lambda t: None)
            rule.forward(layer, record, layer.call, x)
            # The input itself (through stop_gradient and reshapes, which copy nothing).
            x_saved = record.saved["x"]
            while x_saved.op.type in ("StopGradient", "Reshape"):
                x_saved = x_saved.op.inputs[0]
            self.assertIs(x_saved, x)
            for key, t in record.saved.items():
                if key != "x":  # one number per example and row (or group)
                    self.assertLessEqual(t.shape.num_elements() or 0, 4 * 5 * 2, msg=key)
            record.grads["outputs"] = _output_grads(x)
            return rule.per_example_gradients(layer, record)

        x = tf.random.normal([4, 5, 8])
        got = tf.function(forward)(x)
        # The gradients are still right: against the vectorized engine's per-example loop.
        want = _loop_gradients(layer, x)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(g, w, rtol=1e-5, atol=1e-5)


def _output_grads(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(tf.sin(tf.range(tf.size(x), dtype=tf.float32)), x.shape)


def _loop_gradients(layer, x):
    """Per-example gradients of ``sum(outputs * b)`` by one tape per example."""
    b = _output_grads(x)
    variables = layer_rules.get_layer_rule(layer).variables(layer)
    per_example = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            y = layer(x[i : i + 1])
            loss = tf.reduce_sum(y * b[i : i + 1])
        per_example.append(tape.gradient(loss, variables))
    return [tf.stack([g[k] for g in per_example]) for k in range(len(variables))]


if __name__ == "__main__":
    tf.test.main()
