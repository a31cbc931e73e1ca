"""Every private Keras / TensorFlow API that ``tf_autoclip/_keras_compat.py`` wraps still
exists and behaves as the package relies on; so do the public replacements of private
methods (``rules/conv.causal_padding``, ``rules/normalization.into_groups``).

One test per entry of ``_keras_compat``. A failure names the entry, what no longer holds,
the Keras and TensorFlow versions running (against those it was checked: Keras 3.15.1,
TensorFlow 2.21.0) and the place to fix.
"""

import contextlib
import inspect
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_autoclip import _keras_compat as compat
from tf_autoclip import training
from tf_autoclip.engines import vectorized
from tf_autoclip.rules import conv, normalization

L = keras.layers
COMPAT = "tf_autoclip/_keras_compat.py"


class _Inner(L.Layer):
    """A custom layer tracking a sublayer that itself tracks a sublayer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = keras.Sequential([L.Dense(2, name="deep")], name="block")

    def call(self, x):
        return self.block(x)


class _FakeStrategy:
    num_replicas_in_sync = 4


class KerasCompatTest(tf.test.TestCase, parameterized.TestCase):
    @contextlib.contextmanager
    def pinned(self, entry, expectation, where=None):
        """Turn any failure in the block into one message naming the entry and the fix."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - every failure here means the same
            self.fail(
                f"{entry}: {expectation} no longer holds with Keras {keras.__version__}, "
                f"TensorFlow {tf.__version__} (checked with Keras 3.15.1, TensorFlow "
                f"2.21.0): {type(error).__name__}: {error}. A Keras/TensorFlow change broke "
                f"it; update {where or COMPAT + ':' + entry}."
            )

    # -- layers ---------------------------------------------------------------------------
    def test_functional(self):
        with self.pinned("Functional", "keras.Model(inputs, outputs) is an instance of it"):
            inputs = keras.Input((3,))
            model = keras.Model(inputs, L.Dense(2)(inputs))
            assert type(model) is compat.Functional, type(model)
            assert issubclass(training.DPFunctional, keras.Model)

    def test_all_layers(self):
        with self.pinned("all_layers", "Layer._flatten_layers lists nested layers recursively"):
            model = keras.Sequential([keras.Input((3,)), _Inner(name="inner"), L.Dense(1)])
            names = [layer.name for layer in compat.all_layers(model)]
            assert names[0] == model.name, names
            assert {"inner", "block", "deep"} <= set(names), names
            without = [layer.name for layer in compat.all_layers(model, include_self=False)]
            assert without == names[1:], (names, without)

    def test_direct_sublayers(self):
        with self.pinned("direct_sublayers", "_flatten_layers(recursive=False) lists children"):
            inner = _Inner(name="inner")
            assert [layer.name for layer in compat.direct_sublayers(inner)] == ["block"]

    def test_is_layer(self):
        with self.pinned("is_layer", "layers (not keras.ops nodes) have _flatten_layers"):
            inputs = keras.Input((3,))
            model = keras.Model(inputs, keras.ops.add(L.Dense(3)(inputs), inputs))
            kinds = {type(op).__name__: compat.is_layer(op) for op in model.operations}
            assert kinds == {"InputLayer": True, "Dense": True, "Add": False}, kinds
            assert compat.is_layer(model)
            assert not compat.is_layer(tf.constant(1.0))

    def test_seed_generators(self):
        with self.pinned("seed_generators", "Layer._seed_generators lists a layer's generators"):
            dropout = L.Dropout(0.5)
            model = keras.Sequential(
                [keras.Input((3,)), dropout, L.GaussianNoise(0.1), keras.Sequential([dropout])]
            )
            found = compat.seed_generators(model)
            assert len(found) == 2, found  # the shared Dropout counted once
            assert all(isinstance(sg, keras.random.SeedGenerator) for sg in found), found
            assert found[0] is dropout.seed_generator
            self.assertIs(vectorized._seed_generators, compat.seed_generators)

    def test_own_variables(self):
        with self.pinned("own_variables", "_trainable_variables lists a layer's own variables"):
            model = keras.Sequential([keras.Input((3,)), L.Dense(2)])  # its Dense's, not its own
            assert compat.own_variables(model) == [], compat.own_variables(model)
            dense = L.Dense(2)
            dense.build((None, 3))
            assert compat.own_variables(dense) == [dense.kernel, dense.bias]
            dense.trainable = False
            assert compat.own_variables(dense) == [dense.kernel, dense.bias]

    def test_kernel_and_embeddings_variables(self):
        with self.pinned("kernel_variable", "_kernel is the kernel variable, also under LoRA"):
            for layer, shape in [
                (L.Dense(2), (None, 3)),
                (L.EinsumDense("ab,bc->ac", 2), (None, 3)),
                (L.Conv1D(2, 3), (None, 5, 3)),
            ]:
                layer.build(shape)
                kernel = compat.kernel_variable(layer)
                assert isinstance(kernel, keras.Variable), kernel
                assert kernel.trainable and kernel in layer.trainable_variables
                if not isinstance(layer, L.Conv1D):
                    layer.enable_lora(1)
                    assert compat.kernel_variable(layer) is kernel
                    assert not kernel.trainable
        with self.pinned("embeddings_variable", "_embeddings is the table variable"):
            embedding = L.Embedding(5, 2)
            embedding.build((None, 3))
            table = compat.embeddings_variable(embedding)
            assert isinstance(table, keras.Variable) and tuple(table.shape) == (5, 2)

    def test_call_has_training_arg(self):
        with self.pinned("call_has_training_arg", "_call_has_training_arg reflects call()"):

            class NoTraining(L.Layer):
                def call(self, x):
                    return x

            assert compat.call_has_training_arg(L.Dropout(0.5))
            assert not compat.call_has_training_arg(NoTraining())

    def test_inbound_nodes_and_build_input_shape(self):
        with self.pinned("inbound_nodes", "_inbound_nodes holds a functional call's arguments"):
            inputs = keras.Input((4, 3))
            dense = L.Dense(2)
            outputs = dense(inputs)[:, 0]
            model = keras.Model(inputs, outputs)
            nodes = compat.inbound_nodes(dense)
            assert len(nodes) == 1 and nodes[0].arguments.args[0] is inputs, nodes
            getitem = [op for op in model.operations if type(op).__name__ == "GetItem"][0]
            key = compat.inbound_nodes(getitem)[0].arguments.args[1]
            assert key == (slice(None), 0), key
        with self.pinned("build_input_shape", "_build_shapes_dict holds the build shape"):
            layer = L.UnitNormalization()
            layer.build((None, 4, 3))
            assert tuple(compat.build_input_shape(layer)) == (None, 4, 3)
            assert compat.build_input_shape(L.UnitNormalization()) is None

    def test_attention_axes(self):
        with self.pinned("attention_axes", "_attention_axes holds the built attention axes"):
            mha = L.MultiHeadAttention(num_heads=1, key_dim=2, attention_axes=(1,))
            x = keras.Input((4, 3))
            mha(x, x)
            assert tuple(compat.attention_axes(mha)) == (1,), compat.attention_axes(mha)

    # -- optimizers -----------------------------------------------------------------------
    def test_applied_batches_and_gradient_accumulators(self):
        with self.pinned("applied_batches", "_iterations counts every apply"):
            variable = keras.Variable(np.zeros(2, "float32"))
            opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
            for _ in range(3):
                opt.apply([np.ones(2, "float32")], [variable])
            assert int(compat.applied_batches(opt).numpy()) == 3
            assert int(opt.iterations.numpy()) == 1
        with self.pinned("gradient_accumulators", "_accumulated_gradients holds the sums"):
            accumulators = compat.gradient_accumulators(opt)
            assert len(accumulators) == 1 and tuple(accumulators[0].shape) == (2,)
            assert any(accumulators[0] is v for v in opt.variables)
            assert compat.gradient_accumulators(keras.optimizers.SGD(0.1)) == []

    # -- masks ----------------------------------------------------------------------------
    def test_masks(self):
        with self.pinned("get_mask/set_mask", "a tensor's Keras mask round-trips"):
            embedded = L.Embedding(5, 2, mask_zero=True)(tf.constant([[1, 0, 2]]))
            self.assertAllEqual(compat.get_mask(embedded), [[True, False, True]])
            t = tf.constant([[[1.0], [10.0], [2.0]], [[3.0], [4.0], [10.0]]])
            assert compat.get_mask(t) is None
            mask = tf.constant([[True, False, True], [True, True, False]])
            compat.set_mask(t, mask)
            self.assertAllEqual(compat.get_mask(t), mask)
            # Losses read the mask: the masked entries (the 10s) do not count.
            loss = keras.losses.MeanSquaredError()(tf.zeros([2, 3, 1]), t)
            self.assertAllClose(loss, (1.0 + 4.0 + 9.0 + 16.0) / 4)

    # -- losses ---------------------------------------------------------------------------
    def test_unscale_loss_for_distribution(self):
        with self.pinned(
            "unscale_loss_for_distribution",
            "Keras losses divide by tf.distribute's num_replicas_in_sync, which it undoes",
        ):
            y, p = tf.zeros([2, 3]), tf.fill([2, 3], 2.0)
            plain = keras.losses.MeanSquaredError()(y, p)
            with mock.patch.object(tf.distribute, "get_strategy", return_value=_FakeStrategy):
                scaled = keras.losses.MeanSquaredError()(y, p)
                unscaled = compat.unscale_loss_for_distribution(scaled)
            self.assertAllClose(scaled, plain / 4.0)
            self.assertAllClose(unscaled, plain)
            self.assertAllClose(compat.unscale_loss_for_distribution(plain), plain)

    def test_regularization_losses(self):
        with self.pinned(
            "regularization_losses", "model.losses of an uncalled model are v.regularizer(v)"
        ):
            model = keras.Sequential(
                [
                    keras.Input((3,)),
                    L.Dense(2, kernel_regularizer="l2", bias_regularizer="l1"),
                    L.Dense(1, activity_regularizer="l2"),
                    L.Dense(1, kernel_regularizer=keras.regularizers.L1L2(0.1, 0.2)),
                ]
            )
            model.layers[0].bias.assign([1.0, -2.0])
            mine = compat.regularization_losses(model)
            self.assertLen(mine, 3)
            self.assertAllClose(sorted(map(float, mine)), sorted(map(float, model.losses)))

    # -- the compiled loss and the trainer ------------------------------------------------
    def _two_outputs(self):
        inputs = keras.Input((3,))
        model = keras.Model(inputs, [L.Dense(1, name="a")(inputs), L.Dense(2, name="b")(inputs)])
        model.compile(optimizer="sgd", loss=["mse", "mae"])
        data = np.ones((4, 3), "float32"), [np.zeros((4, 1), "float32"), np.ones((4, 2), "float32")]
        return model, data

    def test_compile_loss(self):
        with self.pinned(
            "compile_loss/ensure_loss_built",
            "Trainer._compile_loss is the CompileLoss, built by _symbolic_build(data_batch=)",
        ):
            plain = keras.Sequential([keras.Input((3,)), L.Dense(1)])
            assert compat.compile_loss(plain) is None
            model, (x, y) = self._two_outputs()
            loss = compat.compile_loss(model)
            assert loss is not None and not loss.built
            compat.ensure_loss_built(model, (x, y, None))
            assert compat.compile_loss(model) is loss and loss.built
            self.assertLen(loss.metrics, 2)  # one per output: training.train_step updates them

    def test_loss_metrics_replaced(self):
        with self.pinned(
            "loss_metrics_replaced",
            "CompileLoss.call updates its per-output metrics, kept in CompileLoss._metrics",
        ):
            model, (x, y) = self._two_outputs()
            compat.ensure_loss_built(model, (x, y, None))
            loss = compat.compile_loss(model)
            real = list(loss.metrics)

            class Recorder:
                def __init__(self):
                    self.values = []

                def update_state(self, value, sample_weight=None):
                    self.values.append(value)

            y_pred = model(x)
            with compat.loss_metrics_replaced(loss, Recorder) as recorders:
                total = loss(y, y_pred)
            assert [len(r.values) for r in recorders] == [1, 1], recorders
            self.assertAllClose(sum(r.values[0] for r in recorders), total)
            assert list(loss.metrics) == real
            assert all(float(m.result()) == 0.0 for m in real), "real metrics updated"

    def test_loss_tracker(self):
        with self.pinned("loss_tracker", "Trainer._loss_tracker is the Mean logged as 'loss'"):
            model = keras.Sequential([keras.Input((3,)), L.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            tracker = compat.loss_tracker(model)
            assert isinstance(tracker, keras.metrics.Mean) and tracker.name == "loss"
            assert model.metrics[0] is tracker
            logs = model.train_on_batch(np.ones((4, 3)), np.zeros((4, 1)), return_dict=True)
            self.assertAllClose(tracker.result(), logs["loss"])

    def test_own_distribute_strategy(self):
        with self.pinned(
            "own_distribute_strategy",
            "_distribute_strategy is None outside a strategy scope, the strategy inside",
        ):
            outside = keras.Sequential([keras.Input((3,)), L.Dense(1)])
            assert compat.own_distribute_strategy(outside) is None
            assert outside.distribute_strategy is not None  # why the public one won't do
            strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
            with strategy.scope():
                inside = keras.Sequential([keras.Input((3,)), L.Dense(1)])
            assert compat.own_distribute_strategy(inside) is strategy

    def test_maybe_symbolic_build_override_point(self):
        name = compat.MAYBE_SYMBOLIC_BUILD
        with self.pinned(
            "MAYBE_SYMBOLIC_BUILD",
            "fit calls self._maybe_symbolic_build(iterator=...), which DPTrainStepMixin overrides",
            where=f"{COMPAT}:MAYBE_SYMBOLIC_BUILD and training.DPTrainStepMixin.{name}",
        ):
            assert name in vars(training.DPTrainStepMixin)
            parameters = list(inspect.signature(getattr(keras.Model, name)).parameters)
            assert parameters == ["self", "iterator", "data_batch"], parameters
            calls = []

            class Recording(keras.Sequential):
                pass

            def record(self, iterator=None, data_batch=None):
                calls.append(iterator is not None)
                return getattr(keras.Sequential, name)(self, iterator, data_batch)

            setattr(Recording, name, record)
            model = Recording([keras.Input((3,)), L.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            model.fit(np.ones((4, 3)), np.zeros((4, 1)), epochs=1, verbose=0)
            assert calls == [True], calls

    def test_register_private_subclass_name(self):
        with self.pinned(
            "register_private_subclass_name",
            "GLOBAL_CUSTOM_NAMES is the dict keras.saving.get_registered_name consults",
        ):

            @keras.saving.register_keras_serializable(package="keras_compat_test")
            class Mine(keras.Model):
                pass

            private = type("Mine", (training.DPTrainStepMixin, Mine), {})
            compat.register_private_subclass_name(private, "keras_compat_test>Mine")
            assert keras.saving.get_registered_name(private) == "keras_compat_test>Mine"
            assert keras.saving.get_registered_object("keras_compat_test>Mine") is Mine

    # -- TensorFlow -----------------------------------------------------------------------
    def test_in_xla_context(self):
        with self.pinned(
            "in_xla_context", "GraphOrParentsInXlaContext is True only while XLA traces"
        ):
            seen = {}

            def probe(name):
                def fn(x):
                    seen[name] = compat.in_xla_context()
                    return x + 1

                return fn

            tf.function(probe("xla"), jit_compile=True)(tf.constant(1.0))
            tf.function(probe("graph"))(tf.constant(1.0))
            probe("eager")(tf.constant(1.0))
            assert seen == {"xla": True, "graph": False, "eager": False}, seen

    def test_in_xla_context_is_loud_without_the_helper(self):
        # A silent False would make conv rules pick a form ~150x slower under XLA.
        from tensorflow.python.ops import control_flow_util

        with mock.patch.object(control_flow_util, "GraphOrParentsInXlaContext", new=None):
            del control_flow_util.GraphOrParentsInXlaContext
            with self.assertRaisesRegex(RuntimeError, "update tf_autoclip/_keras_compat.py"):
                compat.in_xla_context()

    def test_pfor_converters(self):
        with self.pinned(
            "pfor_converter_registry/pfor_wrap",
            "pfor's registry maps BiasAddGrad to a converter of (stacked_input, get_attr, wrap)",
        ):
            registry = compat.pfor_converter_registry()
            assert isinstance(registry, dict) and "BiasAddGrad" in registry
            # A rank-3 channels-first bias add: TensorFlow's converter fails, ours serves.
            x = tf.reshape(tf.range(2 * 3 * 4 * 5, dtype=tf.float32), [2, 3, 4, 5])
            bias = tf.constant([1.0, 2.0, 3.0, 4.0])

            def one(unit):
                with tf.GradientTape() as tape:
                    tape.watch(bias)
                    out = tf.nn.bias_add(unit, bias, data_format="NCHW")
                    loss = tf.reduce_sum(out * unit)
                return tape.gradient(loss, bias)

            with vectorized.rank_general_pfor_converters():
                assert registry["BiasAddGrad"] is vectorized._bias_add_grad_any_rank
                got = tf.vectorized_map(one, x)
            assert registry["BiasAddGrad"] is not vectorized._bias_add_grad_any_rank
            self.assertAllClose(got, tf.stack([one(x[i]) for i in range(2)]))

    # -- public replacements of private methods -------------------------------------------
    @parameterized.product(
        kernel_size=[1, 3, 4], dilation_rate=[1, 2], data_format=["channels_last", "channels_first"]
    )
    def test_causal_padding(self, kernel_size, dilation_rate, data_format):
        layer = L.Conv1D(
            2, kernel_size, padding="causal", dilation_rate=dilation_rate, data_format=data_format
        )
        with self.pinned(
            "causal_padding",
            "Keras' Conv1D._compute_causal_padding equals rules/conv.causal_padding",
            where="tf_autoclip/rules/conv.py:causal_padding",
        ):
            assert conv.causal_padding(layer) == layer._compute_causal_padding()

    @parameterized.parameters(
        ((3, 5, 4), 2, -1),
        ((3, 4, 5), 4, 1),
        ((3, 2, 2, 6), 3, -1),
        ((3, 6, 2, 2), 1, 1),
        ((3, 5, 4), 4, -1),
    )
    def test_into_groups(self, shape, groups, axis):
        layer = L.GroupNormalization(groups=groups, axis=axis)
        x = tf.reshape(tf.range(np.prod(shape), dtype=tf.float32), shape)
        layer.build(x.shape)
        dynamic = [None] * len(shape)
        dynamic[axis] = shape[axis]

        @tf.function(input_signature=[tf.TensorSpec(dynamic, tf.float32)])
        def both(t):
            return normalization.into_groups(layer, t), layer._reshape_into_groups(t)

        with self.pinned(
            "into_groups",
            "Keras' GroupNormalization._reshape_into_groups equals rules/normalization.into_groups",
            where="tf_autoclip/rules/normalization.py:into_groups",
        ):
            mine, keras_own = normalization.into_groups(layer, x), layer._reshape_into_groups(x)
            assert mine.shape == keras_own.shape, (mine.shape, keras_own.shape)
            self.assertAllEqual(mine, keras_own)
            mine, keras_own = both(x)
            self.assertAllEqual(mine, keras_own)


if __name__ == "__main__":
    tf.test.main()
