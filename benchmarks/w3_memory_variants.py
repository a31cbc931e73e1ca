"""Where W3's extra DP memory is: peak RSS of W3 variants, each in its own process.

  python -m benchmarks.w3_memory_variants [VARIANT ...]

Variants (default: all): ``keras`` / ``bk`` (SGD with momentum 0.9, as in
``benchmarks/engines.py``), ``*_frozen`` (the token embedding, 7.7M of the 10.9M
parameters, not trained: tells parameter-sized costs from activation-sized ones),
``*_plain`` (SGD without momentum), ``bk_lowmem`` (``make_private(..., low_memory=True)``:
no explicit per-example gradient kept for the clipped sum), ``bk_ghostnorms`` /
``bk_explicitnorms`` (every layer's norms in one form: tells the cached explicit
per-example gradients' share). Each child builds W3, records its RSS, runs 3 warm-up
and 5 timed train steps and prints its ``VmHWM`` (peak RSS, TensorFlow runtime
included) as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys

VARIANTS = (
    "keras", "bk", "bk_lowmem", "keras_frozen", "bk_frozen", "keras_plain", "bk_plain",
    "bk_ghostnorms", "bk_explicitnorms",
)  # fmt: skip


def child(variant: str) -> dict:
    """Build, train and measure one variant (run in a fresh process)."""
    from absl import flags

    from benchmarks import engines

    flags.FLAGS(["w3_memory_variants"])
    import keras
    import tensorflow as tf

    import tf_autoclip as ac
    from tf_autoclip import layer_rules

    keras.utils.set_random_seed(0)
    model = engines.WORKLOADS["w3"][0]()
    if "frozen" in variant:
        for layer in model.layers:
            if isinstance(layer, keras.layers.Embedding):
                layer.trainable = False
    momentum = 0.0 if "plain" in variant else 0.9
    if variant.startswith("keras"):
        optimizer = keras.optimizers.SGD(0.05, momentum=momentum)
    else:
        model = ac.make_private(model, engine="bk", low_memory="lowmem" in variant)
        optimizer = ac.DPAutoSGD(learning_rate=0.05, momentum=momentum, noise_multiplier=1.0)
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = engines.batch_for("w3")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    before = engines._status_kb("VmRSS")
    method = {"ghostnorms": "ghost", "explicitnorms": "explicit"}.get(
        variant.split("_")[-1], "mixed"
    )
    with layer_rules.norm_method(method):  # read while tracing
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
    engines.run_steps(model, iter(dataset), 5)
    return {
        "variant": variant,
        "trainable_parameters": sum(int(tf.size(v)) for v in model.trainable_variables),
        "peak_rss_mb": engines._status_kb("VmHWM") / 1024,
        "before_training_rss_mb": before / 1024,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1])))
        return
    for variant in argv or VARIANTS:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.w3_memory_variants", "--child", variant],
            capture_output=True, text=True,
        )  # fmt: skip
        lines = (out.stdout if out.returncode == 0 else out.stderr).strip().splitlines()
        print(lines[-1] if lines else f"{variant}: no output", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
