"""The fast engines' per-model plan (tf_autoclip/engines/plan.py): decided once, and
decided again whenever what it depends on changes (a stale plan could run a model that
is no longer vouched on the one-pass engines, or miss a variable)."""

from unittest import mock

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tf_autoclip import engines
from tf_autoclip import rules as layer_rules
from tf_autoclip.engines import plan as plan_lib

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def mlp(extra=None):
    layers = [keras.Input((3,)), keras.layers.Dense(4, name="hidden")]
    layers += [extra] if extra is not None else []
    return keras.Sequential([*layers, keras.layers.Dense(2, name="out")], name="m")


class PlanTest(tf.test.TestCase):
    def test_describe_names_engine_rules_and_reason(self):
        text = ac.describe_engine(mlp())
        self.assertStartsWith(text, 'engine "auto" picks: bk')
        self.assertIn("hidden (Dense): DenseRule for m/hidden/kernel, m/hidden/bias", text)
        text = ac.describe_engine(mlp(keras.layers.BatchNormalization(name="bn")))
        self.assertStartsWith(text, 'engine "auto" picks: vectorized')
        self.assertIn("'bn' (BatchNormalization)", text)

    def test_registering_a_layer_updates_the_plan(self):
        model = mlp(Doubler())
        self.assertIsNotNone(plan_lib.plan_for(model).unsupported)
        ac.register_per_example_layer(Doubler)
        try:
            self.assertIsNone(plan_lib.plan_for(model).unsupported)
            self.assertEqual(engines.auto_engine_name(model, None), "bk")
        finally:
            ac.layer_safety.unregister_per_example_layer(Doubler)
        self.assertIsNotNone(plan_lib.plan_for(model).unsupported)
        self.assertEqual(engines.auto_engine_name(model, None), "vectorized")

    def test_freezing_and_lora_update_the_plan(self):
        model = mlp()
        hidden = model.get_layer("hidden")
        owners = plan_lib.plan_for(model).owners
        self.assertIn(id(hidden.kernel), owners)
        hidden.trainable = False
        self.assertNotIn(id(hidden.bias), plan_lib.plan_for(model).owners)
        hidden.trainable = True
        hidden.enable_lora(2)
        owners = plan_lib.plan_for(model).owners
        self.assertIn(id(hidden.lora_kernel_a), owners)
        self.assertIn(id(hidden.lora_kernel_b), owners)
        self.assertIn("(LoRA factors)", ac.describe_engine(model))

    def test_rules_are_looked_up_once_per_model(self):
        model = mlp()
        x, y = np.ones((4, 3), "float32"), np.array([0, 1, 0, 1])
        opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=0.0, expected_batch_size=4)
        ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS)
        with mock.patch.object(
            layer_rules, "get_layer_rule", wraps=layer_rules.get_layer_rule
        ) as lookups:
            ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS)
        self.assertEqual(lookups.call_count, 0)


if __name__ == "__main__":
    tf.test.main()
