"""Arguments that would break the mechanism are refused when they are given, with the fix.

``expected_batch_size=nan`` turned every weight to NaN and ``inf`` froze training;
booleans passed as numbers; an empty clipping group or a model without trainable
variables ended in an unrelated TensorFlow error.
"""

import keras
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import testing_models


class OptimizerArgumentsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("nan_batch", {"expected_batch_size": float("nan")}, "expected_batch_size"),
        ("inf_batch", {"expected_batch_size": float("inf")}, "expected_batch_size"),
        ("zero_batch", {"expected_batch_size": 0}, "expected_batch_size"),
        ("negative_batch", {"expected_batch_size": -4}, "expected_batch_size"),
        ("bool_batch", {"expected_batch_size": True}, "expected_batch_size"),
        ("string_batch", {"expected_batch_size": "64"}, "expected_batch_size"),
        ("bool_sigma", {"noise_multiplier": True}, "noise_multiplier"),
        ("nan_sigma", {"noise_multiplier": float("nan")}, "noise_multiplier"),
        ("negative_sigma", {"noise_multiplier": -1.0}, "noise_multiplier"),
        ("bool_microbatches", {"num_microbatches": True}, "num_microbatches"),
        ("float_microbatches", {"num_microbatches": 2.5}, "num_microbatches"),
        ("zero_microbatches", {"num_microbatches": 0}, "num_microbatches"),
        ("bool_seed", {"seed": False}, "seed"),
        ("bool_gamma", {"gamma": True}, "gamma"),
        ("bool_threshold", {"clipping": "abadi", "l2_norm_clip": True}, "l2_norm_clip"),
        ("empty_group", {"clipping_style": [["dense/kernel"], []]}, "non-empty"),
        ("no_groups", {"clipping_style": []}, "non-empty"),
    )
    def test_refused_at_construction(self, kwargs, name):
        kwargs = {"noise_multiplier": 1.0, **kwargs}
        with self.assertRaisesRegex(ValueError, name):
            ac.DPAutoSGD(learning_rate=0.1, **kwargs)

    def test_valid_arguments_kept(self):
        opt = ac.DPAutoSGD(
            learning_rate=0.1, noise_multiplier=1, expected_batch_size=64, num_microbatches=4
        )
        self.assertEqual(opt.noise_multiplier, 1.0)
        self.assertEqual(opt.expected_batch_size, 64.0)
        self.assertEqual(opt.num_microbatches, 4)


class ModelArgumentsTest(tf.test.TestCase):
    def frozen(self) -> keras.Model:
        model = testing_models.mlp()
        model.trainable = False
        return model

    def test_make_private_refuses_a_low_memory_that_is_not_a_bool(self):
        for value in ("no", 0, None):
            with self.assertRaisesRegex(ValueError, "low_memory must be True or False"):
                ac.make_private(testing_models.mlp(), low_memory=value)

    def test_make_private_refuses_a_model_without_trainable_variables(self):
        with self.assertRaisesRegex(ValueError, "no trainable variables"):
            ac.make_private(self.frozen())

    def test_private_gradients_refuses_a_model_without_trainable_variables(self):
        model = self.frozen()
        x, y = testing_models.data_for(model, 4)
        opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, expected_batch_size=4)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        with self.assertRaisesRegex(ValueError, "no trainable variables"):
            ac.private_gradients(model, x, y, optimizer=opt, loss=loss)


if __name__ == "__main__":
    tf.test.main()
