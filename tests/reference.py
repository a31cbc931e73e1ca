"""The reference oracle the tests compare the library against: a plain loop, no library code.

One oracle for every test that checks a private gradient, like the per-sample gradient
oracle Opacus' layer tests share. Contract:

* ``unit_gradients``: one ``tf.GradientTape`` per unit, on the model as given. A unit is
  one example, or ``unit_size`` consecutive examples (a microbatch); its loss is
  ``loss(y_unit, model(x_unit, training=training))`` (with ``sample_weight=`` the unit's
  weights when given), so under a Keras loss's default reduction the mean of its
  examples' losses, plus ``extra_loss(model)`` when given (evaluated inside the tape,
  after the forward pass). ``x`` and ``y`` may be nested (e.g. a dict of labels per
  output). A variable the loss does not reach gets a zero gradient. Returns a list over
  units of lists over ``model.trainable_variables`` of NumPy arrays in the gradients'
  own dtype.
* ``l2_norm`` / ``norms``: L2 norms computed in ``dtype`` (float64 by default; float32
  where a test picks a threshold from float32 norms).
* ``groups_for``: the clipping groups as lists of variable indices, for the
  ``"all-layer"`` and ``"per-layer"`` styles (a layer = the variables sharing a path
  prefix).
* ``clip_factor``: the factor of one unit's group from the paper's formulas, in
  float64: with ``K`` groups each gets the budget ``b = 1 / sqrt(K)``; AUTO-S
  ``b / (||g|| + gamma)``, AUTO-V ``b / ||g||`` (0 for a zero gradient), Abadi
  ``min(1, b R / ||g||)``, global ``1`` if ``||g|| <= b R`` else ``0``; a non-finite
  norm gets 0.
* ``clipped_sum``: ``sum_m sum_k c_{m,k} g_{m,k}`` with the norms in float64; a unit
  with a non-finite norm in any group is dropped, as the library drops it. Accumulated
  in float64 unless ``dtype`` says otherwise (e.g. float32, the precision of a test
  written against float32 sums).
* ``sgd_step``: ``clipped_sum / denominator``, what one private SGD step at learning
  rate 1 with ``noise_multiplier=0`` subtracts from the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

GAMMA = 0.01  # the default gamma of AUTO-S
MODES = ("auto-s", "auto-v", "abadi", "global")
STYLES = ("all-layer", "per-layer")


def unit_gradients(
    model,
    x,
    y,
    loss: Callable,
    *,
    unit_size: int = 1,
    sample_weight=None,
    extra_loss: Callable | None = None,
    training: bool = True,
) -> list[list[np.ndarray]]:
    """Per-unit gradients of ``model``'s trainable variables, one tape per unit."""
    variables = model.trainable_variables
    num_examples = len(tf.nest.flatten(y)[0])
    grads = []
    for start in range(0, num_examples, unit_size):
        rows = slice(start, start + unit_size)
        x_unit = tf.nest.map_structure(lambda a, rows=rows: a[rows], x)
        y_unit = tf.nest.map_structure(lambda a, rows=rows: a[rows], y)
        kwargs = {} if sample_weight is None else {"sample_weight": sample_weight[rows]}
        with tf.GradientTape() as tape:
            value = loss(y_unit, model(x_unit, training=training), **kwargs)
            if extra_loss is not None:
                value += extra_loss(model)
        grads.append(
            [
                np.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g).numpy()
                for g, v in zip(tape.gradient(value, variables), variables, strict=True)
            ]
        )
    return grads


def l2_norm(arrays, dtype=np.float64):
    """L2 norm of a list of arrays (tensors allowed), computed in ``dtype``."""
    total = dtype(0)
    for a in arrays:
        total += np.sum(np.square(np.asarray(a, dtype)))
    return np.sqrt(total)


def norms(grads: Sequence[Sequence[np.ndarray]], dtype=np.float64) -> np.ndarray:
    """Each unit's L2 norm over all its variables, computed in ``dtype``."""
    return np.array([l2_norm(unit, dtype) for unit in grads], dtype)


def groups_for(model, style: str) -> list[list[int]]:
    """Clipping groups (lists of variable indices) of a clipping style."""
    variables = model.trainable_variables
    if style == "all-layer":
        return [list(range(len(variables)))]
    if style != "per-layer":
        raise ValueError(f"unknown style {style!r}")
    prefixes = {}
    for i, v in enumerate(variables):
        prefixes.setdefault(v.path.rpartition("/")[0], []).append(i)
    return list(prefixes.values())


def clip_factor(norm: float, mode: str, *, gamma=GAMMA, R=None, num_groups: int = 1) -> float:
    """The factor ``c`` of one group with L2 norm ``norm``, from the paper's formulas."""
    budget = 1.0 / np.sqrt(num_groups)
    if not np.isfinite(norm):
        return 0.0
    if mode == "auto-s":
        return budget / (norm + gamma)
    if mode == "auto-v":
        return 0.0 if norm == 0 else budget / norm
    if mode == "abadi":
        return min(1.0, budget * R / norm) if norm > 0 else 1.0
    if mode == "global":
        return 1.0 if norm <= budget * R else 0.0
    raise ValueError(f"unknown clipping mode {mode!r}")


def clipped_sum(
    grads: Sequence[Sequence[np.ndarray]],
    groups: Sequence[Sequence[int]] | None = None,
    mode: str = "auto-s",
    *,
    gamma=GAMMA,
    R=None,
    dtype=np.float64,
) -> list[np.ndarray]:
    """``sum_m sum_k c_{m,k} g_{m,k}``; ``groups=None`` is one group of every variable."""
    if groups is None:
        groups = [list(range(len(grads[0])))]
    total = [np.zeros(np.shape(g), dtype) for g in grads[0]]
    for unit in grads:
        group_norms = [l2_norm([unit[i] for i in group]) for group in groups]
        if not all(np.isfinite(group_norms)):
            continue
        for group, norm in zip(groups, group_norms, strict=True):
            c = np.float64(clip_factor(norm, mode, gamma=gamma, R=R, num_groups=len(groups)))
            for i in group:
                total[i] += c * unit[i]
    return total


def sgd_step(
    grads: Sequence[Sequence[np.ndarray]],
    denominator,
    groups: Sequence[Sequence[int]] | None = None,
    mode: str = "auto-s",
    **kwargs,
) -> list[np.ndarray]:
    """``clipped_sum / denominator``: weights before minus after one private SGD step
    at lr 1 and sigma 0. ``kwargs`` go to ``clipped_sum``."""
    return [t / denominator for t in clipped_sum(grads, groups, mode, **kwargs)]
