"""The rule for ``keras.layers.Conv1D`` and ``Conv2D``."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip import _keras_compat
from tf_autoclip.rules.base import LayerRule, _not_quantized, layer_rule
from tf_autoclip.rules.numerics import (
    _dim,
    _explicit_sq64,
    _finite_or_safe,
    _Linear,
    _linear_ghost_sq64,
    _prod,
    f32,
    keep_per_example,
    keep_rows,
    scale_rows,
    squared_rows,
    squared_rows_up64,
    to_f32_up,
    use_ghost,
    weighted_sum,
)


def tracing_for_xla() -> bool:
    """True while a function compiled with XLA (``jit_compile=True``) is being traced.

    XLA on CPU runs the grouped filter gradient of ``_grouped_per_example`` ~150x slower
    than TensorFlow's kernel (measured: W1 of benchmarks/engines.py), so rules pick their
    XLA-friendly form there. TensorFlow has no public API for this: see
    ``_keras_compat.in_xla_context``, which raises rather than guess when it is missing.
    """
    return _keras_compat.in_xla_context()


def causal_padding(layer: keras.layers.Layer) -> list[list[int]]:
    """The ``ops.pad`` widths of ``padding="causal"``: ``dilation_rate * (kernel_size - 1)``
    zeros before each spatial axis, none after (as Keras 3.15's ``Conv1D`` pads).

    >>> causal_padding(keras.layers.Conv1D(2, 3, padding="causal", dilation_rate=2))
    [[0, 0], [4, 0], [0, 0]]
    """
    spatial = [
        [d * (k - 1), 0] for d, k in zip(layer.dilation_rate, layer.kernel_size, strict=True)
    ]
    if layer.data_format == "channels_last":
        return [[0, 0], *spatial, [0, 0]]
    return [[0, 0], [0, 0], *spatial]


# Input channels up to which patches come from a one-hot convolution (several times
# faster than ExtractImagePatches at 1 channel; ~3x slower at 16, W1's second layer).
_FEW_CHANNELS = 4
# Input channels up to which the bk engine takes explicit per-example kernel gradients from
# one grouped filter gradient rather than patches and a batched matmul (not under XLA;
# only where explicit norms are chosen anyway).
# Measured 2026-12-07 (bk, batch 256, a conv + dense model, grouped / patches examples/s):
# 8 channels 1.8-2.0x, 16: 1.4-2.0x, 32: 1.3-1.6x, 64: 0.83-1.19x, 128: 0.84x. W1 (second
# convolution, 16 channels): bk 1.03-1.07x faster than with patches (same-process A/B).
_GROUPED_CHANNELS = 32


def _weighted_by_example(E: tf.Tensor, c: tf.Tensor, finite) -> tf.Tensor:
    """``sum_i c_i E[:, i, :]`` (``[D, P]``) of ``E [D, B, P]``; the rows of dropped
    examples (``c_i = 0``, maybe NaN) contribute exactly 0."""
    shape = tf.shape(E)

    def fast():  # one batched matmul over D: [1, B] x [B, P]
        rows = tf.broadcast_to(tf.reshape(c, [1, 1, -1]), tf.stack([shape[0], 1, shape[1]]))
        return tf.reshape(tf.matmul(rows, E), tf.stack([shape[0], shape[2]]))

    def safe():
        return tf.reduce_sum(tf.math.multiply_no_nan(E, tf.reshape(c, [1, -1, 1])), 1)

    return _finite_or_safe(finite, fast, safe)


def _rows_of(g: tf.Tensor) -> int:
    spatial = g.shape[1:-1]
    if None in spatial:
        return -1
    return _prod(spatial)


@layer_rule(keras.layers.Conv1D, keras.layers.Conv2D)
class ConvRule(LayerRule):
    """``z = conv(a, W) + b``. The per-example kernel gradient is ``P_i^T b_i`` with
    ``P_i`` the patches of example i (``tf.image.extract_patches``), per group."""

    def unsupported_reason(self, layer):
        reason = _not_quantized(layer)
        if reason:
            return reason
        if layer.rank not in (1, 2):
            return "only 1-D and 2-D convolutions have a rule"
        if layer.padding not in ("valid", "same", "causal"):
            return f"padding {layer.padding!r}"
        return None

    def variables(self, layer):
        return [v for v in (_keras_compat.kernel_variable(layer), layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        padding = layer.padding
        if padding == "causal":
            inputs = ops.pad(inputs, causal_padding(layer))
            padding = "valid"
        z = ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            if layer.data_format == "channels_last":
                bias_shape = (1,) * (layer.rank + 1) + (layer.filters,)
            else:
                bias_shape = (1, layer.filters) + (1,) * layer.rank
            z = ops.add(z, ops.reshape(layer.bias, bias_shape))
        record.save(inputs=inputs, padding=padding)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _geometry(self, layer, record):
        """Channels-last 2-D views: inputs ``a [B,H,W,cin]``, output gradients
        ``g [B,H',W',cout]`` (float32), and kernel size, strides, dilations, padding."""
        if "geometry" in record.cache:
            return record.cache["geometry"]
        a, g = f32(record.saved["inputs"]), f32(record.grads["outputs"])
        if layer.data_format == "channels_first":
            perm = [0, *range(2, layer.rank + 2), 1]
            a, g = tf.transpose(a, perm), tf.transpose(g, perm)
        kernel = list(layer.kernel_size)
        strides, rates = list(layer.strides), list(layer.dilation_rate)
        if layer.rank == 1:
            a, g = a[:, None], g[:, None]
            kernel, strides, rates = [1, *kernel], [1, *strides], [1, *rates]
        padding = record.saved["padding"].upper()
        record.cache["geometry"] = (a, g, kernel, strides, rates, padding)
        return record.cache["geometry"]

    def _parts(self, layer, record):
        """``A [B, T, groups, k*cin/groups]`` patches, ``G [B, T, groups, cout/groups]``."""
        if "parts" in record.cache:
            return record.cache["parts"]
        a, g, kernel, strides, rates, padding = self._geometry(layer, record)
        cin = a.shape[-1]
        if cin <= _FEW_CHANNELS:
            # Few channels: a convolution with a one-hot filter gives the same patches
            # several times faster than ExtractImagePatches (measured on x86 CPUs).
            size = _prod(kernel) * cin
            eye = tf.reshape(tf.eye(size, dtype=a.dtype), [*kernel, cin, size])
            patches = tf.nn.conv2d(a, eye, [1, *strides, 1], padding, dilations=[1, *rates, 1])
        else:
            patches = tf.image.extract_patches(
                a, [1, *kernel, 1], [1, *strides, 1], [1, *rates, 1], padding
            )
        groups = layer.groups
        cout = layer.filters
        k, cg = _prod(kernel), cin // groups
        batch = tf.shape(g)[0]
        rows = _rows_of(g)
        if rows == -1:
            rows = tf.reduce_prod(tf.shape(g)[1:-1])
        A = tf.reshape(patches, tf.stack([batch, rows, k, groups, cg]))
        A = tf.reshape(tf.transpose(A, [0, 1, 3, 2, 4]), tf.stack([batch, rows, groups, k * cg]))
        G = tf.reshape(g, tf.stack([batch, rows, groups, cout // groups]))
        record.cache["parts"] = (A, G)
        return A, G

    def _grouped_per_example(self, layer, record) -> tf.Tensor:
        """Per-example kernel gradients ``[k*cin, B, cout]`` (examples on axis 1, as the
        filter gradient gives them: no transpose) without patches: one filter gradient of a
        convolution whose channels are (example, channel) pairs, grouped by example (for
        few input channels, faster than patches + batched matmul)."""
        a, g, kernel, strides, rates, padding = self._geometry(layer, record)
        cin, cout = a.shape[-1], g.shape[-1]
        shape_a, shape_g = tf.shape(a), tf.shape(g)
        batch = shape_a[0]
        folded_a = tf.reshape(
            tf.transpose(a, [1, 2, 0, 3]), tf.stack([1, shape_a[1], shape_a[2], batch * cin])
        )
        folded_g = tf.reshape(
            tf.transpose(g, [1, 2, 0, 3]), tf.stack([1, shape_g[1], shape_g[2], batch * cout])
        )
        grads = tf.raw_ops.Conv2DBackpropFilter(
            input=folded_a,
            filter_sizes=tf.stack([*kernel, cin, batch * cout]),
            out_backprop=folded_g,
            strides=[1, *strides, 1],
            padding=padding,
            dilations=[1, *rates, 1],
        )
        return tf.reshape(grads, tf.stack([_prod(kernel) * cin, batch, cout]))

    def _bias_per_example(self, layer, record) -> tf.Tensor:
        if "bias" not in record.cache:  # read by both squared_norms and clipped_sum
            record.cache["bias"] = tf.reduce_sum(self._geometry(layer, record)[1], [1, 2])
        return record.cache["bias"]

    def _kernel_layout(self, layer, grad, batched: bool):
        """``[(B,) groups, k*cg, og]`` -> the kernel's ``[kh, (kw,) cg, groups*og]``."""
        groups = layer.groups
        kshape = list(layer.kernel.shape)
        k = _prod(kshape[:-2])
        cg, og = kshape[-2], kshape[-1] // groups
        lead = [-1] if batched else []
        off = 1 if batched else 0
        grad = tf.reshape(grad, [*lead, groups, k, cg, og])
        perm = [*range(off), off + 1, off + 2, off, off + 3]
        grad = tf.transpose(grad, perm)
        return tf.reshape(grad, [*lead, *kshape])

    def _kernel_sq(self, layer, record):
        a, g = self._geometry(layer, record)[:2]
        rows = _rows_of(g)
        few_channels = a.shape[-1] <= _GROUPED_CHANNELS
        if (
            layer.groups == 1
            and few_channels
            and rows != -1
            and keep_per_example()  # its clipped sum adds this tensor
            and not tracing_for_xla()
        ):
            kernel_size = _prod(layer.kernel_size) * a.shape[-1]
            if use_ghost(rows, kernel_size, layer.filters) is False:
                per_example = self._grouped_per_example(layer, record)  # [D, B, P]
                record.cache["kernel_by_example"] = per_example
                return to_f32_up(squared_rows_up64(per_example, batch_axis=1))
        A, G = self._parts(layer, record)
        rows = _dim(A, 1)
        ghost = use_ghost(rows, A.shape[-1] * layer.groups, G.shape[-1])
        if layer.groups == 1:
            linear = _Linear(record, "kernel_per_example", A[:, :, 0], G[:, :, 0])
            record.cache["linear"] = linear
            return linear.sq_norm()
        # Groups: one linear map per (example, group); fold the groups into the batch
        # and add the groups' bounds (in float64, so the sum cannot round below).
        batch = tf.shape(A)[0]
        A_r = tf.reshape(tf.transpose(A, [0, 2, 1, 3]), tf.stack([-1, rows, A.shape[-1]]))
        G_r = tf.reshape(tf.transpose(G, [0, 2, 1, 3]), tf.stack([-1, rows, G.shape[-1]]))

        def per_example():
            return tf.einsum("btrd,btrp->brdp", A, G)

        def by_example(sq):  # [B * groups] -> [B], summed before the float32 cast
            return to_f32_up(tf.reduce_sum(tf.reshape(sq, [batch, layer.groups]), 1))

        def ghost_fn():
            return by_example(_linear_ghost_sq64(A_r, G_r))

        def explicit_fn():  # not the tensor the clipped sum adds (see clipped_sum)
            E = tf.reshape(per_example(), tf.stack([-1, A.shape[-1], G.shape[-1]]))
            return by_example(_explicit_sq64(E, A_r, G_r))

        if ghost is True:
            return ghost_fn()
        if ghost is False and not keep_per_example():  # low_memory: summed from patches
            return explicit_fn()
        if ghost is False:  # the clipped sum adds this very tensor
            record.cache["grouped_per_example"] = per_example()
            return squared_rows(record.cache["grouped_per_example"])
        return tf.cond(ghost, ghost_fn, explicit_fn)

    def per_example_gradients(self, layer, record):
        A, G = self._parts(layer, record)
        kernel = self._kernel_layout(layer, tf.einsum("btrd,btrp->brdp", A, G), batched=True)
        grads = [kernel]
        if layer.use_bias:
            grads.append(self._bias_per_example(layer, record))
        return grads

    def squared_norms(self, layer, record):
        norms = [self._kernel_sq(layer, record)]
        if layer.use_bias:
            norms.append(squared_rows(self._bias_per_example(layer, record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        c, finite = factors[0], record.all_finite
        linear = record.cache.get("linear")
        if "kernel_by_example" in record.cache:
            kernel = _weighted_by_example(record.cache["kernel_by_example"], c, finite)[None]
        elif "kernel_per_example" in record.cache:  # _Linear's explicit tensor
            kernel = weighted_sum(record.cache["kernel_per_example"], c, finite)[None]
        elif linear is not None:
            kernel = linear.clipped_sum(c)[None]
        elif "grouped_per_example" in record.cache:
            kernel = weighted_sum(record.cache["grouped_per_example"], c, finite)
        else:
            A, G = self._parts(layer, record)
            kernel = tf.einsum("btrd,btrp->rdp", keep_rows(A, c, finite), scale_rows(G, c, finite))
        sums = [self._kernel_layout(layer, kernel, batched=False)]
        if layer.use_bias:
            bias = self._bias_per_example(layer, record)
            sums.append(weighted_sum(bias, factors[1], finite))
        return sums
