"""LoRA (Keras' ``enable_lora``) on the fast engines: only the LoRA factors are clipped
and noised, and their clipped sum matches a plain per-example loop.

Under ``enable_lora(r)`` a Dense or EinsumDense kernel is ``W + s A B`` with ``W``
frozen. The rules give the per-example gradients of ``A`` and ``B`` as linear maps of
the layer's rows (never forming a per-example ``[D, P]`` kernel gradient); this checks
them, with ghost and explicit norms, against one GradientTape per example.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models
from tests.engine_cases import LAYER_CASES, LOSS, EngineTestCase, engine_sum, layer_case_data
from tf_autoclip import engines, layer_rules

LORA_CASES = [
    "dense_2d",
    "dense_seq",
    "dense_4d_no_bias",
    "einsum_2d",
    "einsum_heads",
    "einsum_merge_heads",
    "einsum_ellipsis",
]


def enable_lora(model: keras.Model, rank: int = 2, seed: int = 0) -> None:
    """LoRA on every Dense/EinsumDense but the last (the head stays fully trainable),
    with random ``B`` factors (Keras starts them at 0, which would hide ``A``'s gradient)."""
    rng = np.random.default_rng(seed)
    layers = [
        layer
        for layer in layer_rules.all_layers(model)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    for layer in layers[:-1]:
        layer.enable_lora(rank, lora_alpha=3 * rank)  # s = 3, not the default 1
        b = layer.lora_kernel_b
        b.assign(rng.normal(size=b.shape).astype("float32"))


class LoraRuleTest(EngineTestCase):
    @parameterized.named_parameters((name, name) for name in LORA_CASES)
    def test_lora_rule_matches_loop(self, name):
        shape, dtype, factory = LAYER_CASES[name]
        keras.utils.set_random_seed(7)
        model = testing_models.single_layer(shape, factory, dtype)
        enable_lora(model)
        paths = [v.path for v in model.trainable_variables]
        self.assertTrue(any("lora_kernel_a" in p for p in paths), paths)
        self.assertFalse(any(p.endswith("/kernel") and "lora" not in p for p in paths[:-2]))
        self.assertIsNone(engines.bk.unsupported_reason(model, None))
        x, y = layer_case_data(shape, dtype)
        grads = reference.unit_gradients(model, x, y, LOSS)
        want = reference.clipped_sum(grads, reference.groups_for(model, "per-layer"))
        for method in ("ghost", "explicit"):
            with self.subTest(method=method), layer_rules.norm_method(method):
                got = engine_sum(model, x, y, "bk", style="per-layer")
                self.assert_sums_close(got, want)
        with self.subTest(engine="ghost"):
            self.assert_sums_close(engine_sum(model, x, y, "ghost", style="per-layer"), want)

    def test_transformer_with_lora_uses_bk_and_matches_loop(self):
        keras.utils.set_random_seed(8)
        model = testing_models.pre_ln_transformer()
        enable_lora(model, rank=3)
        self.assertIs(engines.select_engine("auto", model, None), engines.bk.bk_engine)
        x, y = testing_models.data_for(model, 5, seed=2, ids=(1, 6), pad=2)
        grads = reference.unit_gradients(model, x, y, LOSS)
        want = reference.clipped_sum(grads)
        self.assert_sums_close(engine_sum(model, x, y, "auto"), want)

    def test_lora_equation_without_output_axis_last_falls_back(self):
        # Kernel letters "bc" with c contracted away: LoRA's B factor maps to no output axis.
        layer = keras.layers.EinsumDense("abc,bc->ab", (4,))
        model = testing_models.single_layer((4, 3), lambda: layer)
        layer.enable_lora(2)
        reason = engines.bk.unsupported_reason(model, None)
        self.assertIn("LoRA", reason)


class LoraTrainingTest(tf.test.TestCase):
    def test_fit_trains_only_lora_factors_with_noise(self):
        keras.utils.set_random_seed(9)
        model = testing_models.pre_ln_transformer()
        enable_lora(model)
        frozen = {v.path: v.numpy() for v in model.non_trainable_variables if "kernel" in v.path}
        self.assertNotEmpty(frozen)
        lora = {v.path: v.numpy() for v in model.trainable_variables if "lora" in v.path}
        ac.make_private(model)
        model.compile(
            optimizer=ac.DPAutoAdam(
                learning_rate=1e-2, noise_multiplier=1.0, expected_batch_size=5
            ),
            loss=LOSS,
        )
        x, y = testing_models.data_for(model, 5, seed=3, ids=(1, 6), pad=2)
        model.fit(x, y, batch_size=5, epochs=2, verbose=0)
        for v in model.non_trainable_variables:
            if v.path in frozen:
                self.assertAllEqual(v.numpy(), frozen[v.path], msg=v.path)
        for v in model.trainable_variables:
            if v.path in lora:
                self.assertNotAllClose(v.numpy(), lora[v.path], msg=v.path)


if __name__ == "__main__":
    tf.test.main()
