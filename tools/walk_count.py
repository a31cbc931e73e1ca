"""How far one request walks through the library on the default (book-keeping) path.

Traces every call into a ``tf_autoclip`` function while ``ac.private_gradients`` computes
one batch of a small Dense + Embedding model in eager mode (engine "auto", which picks
book-keeping), then prints: the files visited, the number of hops between files, the
number of hops back into a file the walk had already left, and how often "which layer
has which rule" (``get_layer_rule``) and "is this model vouched" (``unvouched_reason``)
were decided. ``--cold`` traces the model's first batch instead of its second. Run
from the repository root (or any checkout, to compare commits):

    python tools/walk_count.py [--cold] [--one_layer] [--show]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_autoclip as ac  # noqa: E402


def _model() -> keras.Model:
    if "--one_layer" in sys.argv:  # one Dense layer: no per-layer repetition in the walk
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(3)(inputs))
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 8)(inputs)
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def walk(cold: bool = False) -> tuple[list[str], list[str]]:
    """The ``tf_autoclip`` files and function names of the calls made for one batch."""
    model = _model()
    x = np.random.default_rng(0).integers(0, 20, (4, 6)).astype(model.inputs[0].dtype)
    y = np.array([0, 1, 2, 0])
    opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, expected_batch_size=4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if not cold:
        ac.private_gradients(model, x, y, optimizer=opt, loss=loss)  # build, fill caches
    root = os.path.dirname(ac.__file__)
    files: list[str] = []
    names: list[str] = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            files.append(os.path.relpath(frame.f_code.co_filename, root))
            names.append(frame.f_code.co_name)

    sys.setprofile(tracer)
    try:
        ac.private_gradients(model, x, y, optimizer=opt, loss=loss)
    finally:
        sys.setprofile(None)
    return files, names


def reading_walk(files: list[str], names: list[str]) -> list[str]:
    """The files of each function in the order a reader meets it: first calls only (a
    function called again, e.g. once per layer, is not read again)."""
    seen: set[tuple[str, str]] = set()
    walk = []
    for f, n in zip(files, names, strict=True):
        if (f, n) not in seen:
            seen.add((f, n))
            walk.append(f)
    return walk


def summarize(files: list[str], names: list[str]) -> dict[str, object]:
    read = reading_walk(files, names)
    read_hops = [f for i, f in enumerate(read) if i == 0 or f != read[i - 1]]
    hops = [f for i, f in enumerate(files) if i == 0 or f != files[i - 1]]
    seen: set[str] = set()
    returns = 0
    for f in hops:
        returns += f in seen
        seen.add(f)
    read_seen: set[str] = set()
    read_returns = 0
    for f in read_hops:
        read_returns += f in read_seen
        read_seen.add(f)
    return {
        "reading hops": len(read_hops) - 1,
        "reading returns": read_returns,
        "files": len(seen),
        "hops": len(hops) - 1,
        "returns": returns,
        "rule lookups": names.count("get_layer_rule"),
        "vouching walks": names.count("unvouched_reason"),
        "path": hops,
    }


if __name__ == "__main__":
    result = summarize(*walk(cold="--cold" in sys.argv))
    print(f"files visited: {result['files']}")
    print(f"hops between files: {result['hops']}")
    print(f"hops back into a file already left: {result['returns']}")
    print(
        f"reading walk (each function once): {result['reading hops']} hops, "
        f"{result['reading returns']} back into a file already left"
    )
    print(f"get_layer_rule calls: {result['rule lookups']}")
    print(f"unvouched_reason calls: {result['vouching walks']}")
    if "--show" in sys.argv:
        print(" -> ".join(result["path"]))
