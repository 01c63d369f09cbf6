"""Differentiable ops whose gradients use forward ops only.

TensorFlow's own gradients of convolution, pooling and ReLU are dedicated
kernels (`Conv2DBackpropFilter`, `MaxPoolGrad`, `ReluGrad`, ...) that neither
the plain LiteRT runtime nor ONNX has. Each op here has a `tf.custom_gradient`
written with ops both can run: convolutions (transposed ones too: LiteRT's
TRANSPOSE_CONV, ONNX's ConvTranspose), matrix products, slices, comparisons,
pads and reshapes. Spatial sizes are static (known from the model); the batch
size stays dynamic. Where the runtimes differ in what is fast, an op is
written for the one being exported to (`runtime`), with the same values.

Every gradient here matches TensorFlow's own to float32 rounding, including
max-pool ties, which go to the first maximum of each window in row-major
order, as `MaxPoolGrad` does, and the gradient at each activation's kink
(ReLU6 at 0 and 6, hard swish at -3 and 3), as TensorFlow's (tests compare them).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import tensorflow as tf

_RUNTIME = contextvars.ContextVar("keras_split_export_runtime", default="tflite")


@contextlib.contextmanager
def runtime(name: str):
    """Write the ops for `name` ("tflite" or "onnx") while tracing.

    The two runtimes differ in what is cheap: LiteRT runs a strided slice one
    value at a time (about 30x slower than space_to_depth for the same
    gather) and has native NHWC space_to_depth/depth_to_space; ONNX's are
    NCHW, so each costs two layout transposes, and strided slices are cheap.
    The values are the same either way.
    """
    token = _RUNTIME.set(name)
    try:
        yield
    finally:
        _RUNTIME.reset(token)


def _lite() -> bool:
    return _RUNTIME.get() != "onnx"


@contextlib.contextmanager
def frozen_weights():
    """Trace for an inference-only export, whose weights become constants:
    plain convolutions then, which XNNPACK runs fastest with constant weights
    and the quantizer knows how to quantize."""
    token = _RUNTIME.set("frozen")
    try:
        yield
    finally:
        _RUNTIME.reset(token)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) for one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pads(x_shape, kernel_hw, strides, padding):
    if padding == "VALID":
        return (0, 0), (0, 0)
    return tuple(_same_padding(x_shape[i + 1], kernel_hw[i], strides[i]) for i in range(2))


def _dilate(g, strides):
    """Insert stride-1 zeros between the rows and columns of `g` (NHWC)."""
    for axis, stride in ((1, strides[0]), (2, strides[1])):
        if stride == 1:
            continue
        size = g.shape[axis]
        zeros = tf.zeros_like(g)
        g = tf.stack([g] + [zeros] * (stride - 1), axis=axis + 1)
        shape = tf.concat([tf.shape(g)[:axis], [size * stride], tf.shape(g)[axis + 2:]], 0)
        g = tf.reshape(g, shape)
        g = g[:, : (size - 1) * stride + 1] if axis == 1 else g[:, :, : (size - 1) * stride + 1]
    return g


# Convolutions run as one matrix product over gathered patches (im2col):
# LiteRT's XNNPACK runs a product with variable weights, not a CONV_2D with
# variable weights (2x faster for the demo's second convolution), and ONNX
# needs no layout transposes around a product. In LiteRT, patches of inputs
# with fewer channels than this are gathered by a convolution with a constant
# 0/1 kernel (which XNNPACK runs fast: copying one-channel slices is slow);
# wider inputs, and all in ONNX, by slices.
IM2COL_MIN_CHANNELS = 8


def conv2d(x, kernel, strides=(1, 1), padding="VALID", bias=None):
    """NHWC convolution (no dilation, one group), plus `bias` if given.

    Forward as a matrix product over patches; the kernel gradient is the
    product of the same patches with the output gradient; the input gradient
    a transposed convolution, which LiteRT (TRANSPOSE_CONV) and ONNX
    (ConvTranspose) run as forward ops. A bias rides in the product as one
    more weight row against a patch entry of 1: no pass over the output to
    add it, and its gradient (the output gradient's sum) comes with the
    kernel's.
    """
    strides, padding = tuple(strides), padding.upper()
    kh, kw, cin, cout = kernel.shape
    if _RUNTIME.get() == "frozen" or ((kh, kw) == (1, 1) and strides == (1, 1)):
        y = (tf.nn.conv2d(x, kernel, strides, padding) if _RUNTIME.get() == "frozen"
             else _pointwise(x, kernel))
        return y if bias is None else bias_add(y, bias)
    # One input channel in onnxruntime: the patches as rows ([taps, positions]),
    # stacked without interleaving one value at a time; the kernel gradient is
    # then a plain product, the forward one with the small operand transposed.
    by_rows = cin == 1 and not _lite()
    size = kh * kw * cin

    def product(x, kernel, bias):
        oh, ow = _output_hw(x.shape, (kh, kw), strides, padding)
        weights = tf.reshape(kernel, [size, cout])
        if bias is not None:
            weights = tf.concat([weights, tf.reshape(bias, [1, cout])], 0)
        if by_rows:
            rows = [tf.reshape(p, [1, -1]) for p in _patches(x, (kh, kw), (oh, ow), strides,
                                                             padding)]
            if bias is not None:
                rows.append(tf.ones_like(rows[0]))
            patches = tf.concat(rows, 0)
            y = tf.matmul(patches, weights, transpose_a=True)
        else:
            patches = _columns(x, (kh, kw), (oh, ow), strides, padding, ones=bias is not None)
            y = tf.matmul(patches, weights)
        y = tf.reshape(y, [-1, oh, ow, cout])

        def backward(g):
            g2 = tf.reshape(g, [-1, cout])
            dw = tf.matmul(patches, g2) if by_rows else tf.matmul(patches, g2, transpose_a=True)
            dx = _conv_input_gradient(g, kernel, x.shape, strides, padding)
            dk = tf.reshape(dw[:size], [kh, kw, cin, cout])
            return (dx, dk) if bias is None else (dx, dk, dw[size])

        return y, backward

    if bias is None:
        return tf.custom_gradient(lambda x, kernel: product(x, kernel, None))(x, kernel)
    return tf.custom_gradient(product)(x, kernel, bias)


def _pointwise(x, kernel):
    """A 1x1 convolution with stride 1: a matrix product over positions."""
    cin, cout = kernel.shape[2], kernel.shape[3]
    height, width = x.shape[1], x.shape[2]

    @tf.custom_gradient
    def forward(x, kernel):
        rows, weights = tf.reshape(x, [-1, cin]), tf.reshape(kernel, [cin, cout])
        y = tf.reshape(tf.matmul(rows, weights), [-1, height, width, cout])

        def backward(g):
            g = tf.reshape(g, [-1, cout])
            dx = tf.reshape(tf.matmul(g, _transposed(weights)), [-1, height, width, cin])
            dk = tf.reshape(tf.matmul(rows, g, transpose_a=True), [1, 1, cin, cout])
            return dx, dk

        return y, backward

    return forward(x, kernel)


def _transposed(matrix):
    """`matrix` transposed, as an operand of a matrix product.

    LiteRT's converter folds any transpose of a product's right operand into
    a FULLY_CONNECTED, which with variable weights runs 4x slower than the
    BATCH_MATMUL it otherwise writes (XNNPACK's); a gather of the values in
    transposed order is the same transpose, which it leaves alone.
    """
    if not _lite():
        return tf.transpose(matrix)
    rows, cols = matrix.shape
    order = np.arange(rows * cols).reshape(rows, cols).T.reshape(-1)
    return tf.reshape(tf.gather(tf.reshape(matrix, [-1]), order), [cols, rows])


def _output_hw(x_shape, kernel_hw, strides, padding):
    if padding == "SAME":
        return tuple(-(-x_shape[i + 1] // strides[i]) for i in range(2))
    return tuple((x_shape[i + 1] - kernel_hw[i]) // strides[i] + 1 for i in range(2))


def _columns(x, kernel_hw, out_hw, strides, padding, ones=False):
    """im2col: [batch * oh * ow, kh * kw * channels (+ 1: a column of ones)],
    taps in kernel order."""
    kh, kw = kernel_hw
    size = kh * kw * x.shape[3]
    if x.shape[3] < IM2COL_MIN_CHANNELS and _lite():
        # Exact: each output is one input value times 1 plus zeros (and the
        # column of ones is the constant bias of that convolution).
        gather = np.eye(size, size + ones, dtype=np.float32).reshape(kh, kw, x.shape[3],
                                                                     size + ones)
        columns = tf.nn.conv2d(x, tf.constant(gather, x.dtype), strides, padding)
        if ones:
            columns = tf.nn.bias_add(columns, tf.constant(np.eye(size + 1)[-1], x.dtype))
        return tf.reshape(columns, [-1, size + ones])
    patches = _patches(x, kernel_hw, out_hw, strides, padding)
    if ones:
        patches.append(tf.ones_like(patches[0][..., :1]))
    return tf.reshape(tf.concat(patches, axis=3), [-1, size + ones])


def _conv_input_gradient(g, kernel, x_shape, strides, padding):
    """Conv2DBackpropInput, written as the transposed convolution it is.

    In LiteRT, with stride 1, as one matrix product per kernel tap (XNNPACK's
    BATCH_MATMUL) whose results are shifted into place and added: 20% faster
    than its TRANSPOSE_CONV, which XNNPACK takes only with constant weights.
    """
    kh, kw, cin, cout = kernel.shape
    if not (_lite() and strides == (1, 1)):
        shape = tf.stack([tf.shape(g)[0], x_shape[1], x_shape[2], x_shape[3]])
        return tf.nn.conv2d_transpose(g, kernel, shape, strides, padding)
    (top, _), (left, _) = _pads(x_shape, (kh, kw), strides, padding)
    oh, ow = g.shape[1], g.shape[2]
    rows, total = tf.reshape(g, [-1, cout]), None
    for i in range(kh):
        for j in range(kw):
            part = tf.reshape(tf.matmul(rows, _transposed(kernel[i, j])), [-1, oh, ow, cin])
            part = tf.pad(part, [[0, 0], [i, kh - 1 - i], [j, kw - 1 - j], [0, 0]])
            total = part if total is None else total + part
    return total[:, top: top + x_shape[1], left: left + x_shape[2], :]


def _spread(g, kernel_hw, x_shape, strides, padding):
    """The output gradient laid out for a full correlation with the flipped kernel.

    Dilating `g` by the strides and padding it by the kernel size less one
    makes `conv(spread, flipped kernel, VALID)` the gradient of the padded
    input; crop it with the returned (top, left) offsets.
    """
    kh, kw = kernel_hw
    (top, bottom), (left, right) = _pads(x_shape, (kh, kw), strides, padding)
    d = _dilate(g, strides)
    rows = x_shape[1] + top + bottom - (d.shape[1] + kh - 1)
    cols = x_shape[2] + left + right - (d.shape[2] + kw - 1)
    d = tf.pad(d, [[0, 0], [kh - 1, kh - 1 + rows], [kw - 1, kw - 1 + cols], [0, 0]])
    return d, top, left


def _patches(x, kernel_hw, out_hw, strides, padding):
    """The kh * kw strided views of (padded) `x` that meet each kernel tap (im2col)."""
    kh, kw = kernel_hw
    (top, bottom), (left, right) = _pads(x.shape, (kh, kw), strides, padding)
    oh, ow = out_hw
    step = strides[0]
    if step > 1 and strides[1] == step and _lite():
        # space_to_depth turns every stride-s view into a channel block of one
        # tensor at a stride-1 offset: contiguous slices instead of strided ones.
        rows, cols = step * ((kh - 1) // step + oh), step * ((kw - 1) // step + ow)
        x = tf.pad(x, [[0, 0], [top, max(rows - x.shape[1] - top, 0)],
                       [left, max(cols - x.shape[2] - left, 0)], [0, 0]])
        blocks = tf.nn.space_to_depth(x[:, :rows, :cols, :], step)
        channels = x.shape[3]
        result = []
        for i in range(kh):
            for j in range(kw):
                block = (i % step) * step + j % step
                result.append(blocks[:, i // step: i // step + oh, j // step: j // step + ow,
                                     block * channels: (block + 1) * channels])
        return result
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    return [x[:, i: i + (oh - 1) * strides[0] + 1: strides[0],
              j: j + (ow - 1) * strides[1] + 1: strides[1], :]
            for i in range(kh) for j in range(kw)]


def _conv_kernel_gradient(x, g, kernel_shape, strides, padding):
    # dK[i, j] = sum over batch and positions of x_patch(i, j)^T g: one matmul
    # over the patches gathered by strided slices (im2col).
    kh, kw, cin, cout = kernel_shape
    columns = _columns(x, (kh, kw), g.shape[1:3], strides, padding)
    gradient = tf.matmul(columns, tf.reshape(g, [-1, cout]), transpose_a=True)
    return tf.reshape(gradient, [kh, kw, cin, cout])


def depthwise_conv2d(x, kernel, strides=(1, 1), padding="VALID"):
    """NHWC depthwise convolution, kernel [kh, kw, channels, multiplier] (no dilation)."""
    strides, padding = tuple(strides), padding.upper()

    @tf.custom_gradient
    def forward(x, kernel):
        y = tf.nn.depthwise_conv2d(x, kernel, (1, *strides, 1), padding)

        def backward(g):
            return _depthwise_input_gradient(g, kernel, x.shape, strides, padding), \
                _depthwise_kernel_gradient(x, g, kernel.shape, strides, padding)

        return y, backward

    return forward(x, kernel)


def _depthwise_input_gradient(g, kernel, x_shape, strides, padding):
    # As for a convolution, channel by channel: the spread gradient correlated
    # with the spatially flipped kernel. Output channel c * multiplier + m
    # comes from input channel c, so with a multiplier each m is one
    # depthwise pass over its slice of the gradient, and the passes add up.
    kh, kw, channels, multiplier = kernel.shape
    flipped = kernel[::-1, ::-1]
    d, top, left = _spread(g, (kh, kw), x_shape, strides, padding)
    if multiplier == 1:
        full = tf.nn.depthwise_conv2d(d, flipped, (1, 1, 1, 1), "VALID")
    else:
        d = tf.reshape(d, [-1, d.shape[1], d.shape[2], channels, multiplier])
        full = tf.add_n([tf.nn.depthwise_conv2d(d[..., m], flipped[..., m: m + 1],
                                                (1, 1, 1, 1), "VALID")
                         for m in range(multiplier)])
    return full[:, top: top + x_shape[1], left: left + x_shape[2], :]


def _depthwise_kernel_gradient(x, g, kernel_shape, strides, padding):
    # dK[i, j, c, m] = sum over batch and positions of x_patch(i, j)[c] *
    # g[c * multiplier + m]: each tap's patch times the gradient, summed (no
    # stacked copy of the patches).
    kh, kw, channels, multiplier = kernel_shape
    patches = _patches(x, (kh, kw), g.shape[1:3], strides, padding)
    if multiplier > 1:
        g = tf.reshape(g, [-1, g.shape[1], g.shape[2], channels, multiplier])
    taps = []
    for patch in patches:
        if multiplier == 1:
            taps.append(sum_to_channels(patch * g))
        else:
            taps.append(tf.stack([sum_to_channels(patch * g[..., m])
                                  for m in range(multiplier)], axis=-1))
    return tf.reshape(tf.stack(taps), [kh, kw, channels, multiplier])


def sum_to_channels(x):
    """Sum over every axis but the last: height and width first, then the batch
    (one reduction over the three leading axes is 20x slower in onnxruntime)."""
    if len(x.shape) > 2:
        x = tf.reduce_sum(x, axis=list(range(1, len(x.shape) - 1)))
    return tf.reduce_sum(x, axis=0)


@tf.custom_gradient
def bias_add(x, bias):
    def backward(g):
        return g, sum_to_channels(g)

    return x + bias, backward


@tf.custom_gradient
def matmul(x, kernel):
    def backward(g):
        return tf.matmul(g, _transposed(kernel)), tf.matmul(x, g, transpose_a=True)

    return tf.matmul(x, kernel), backward


@tf.custom_gradient
def relu(x):
    def backward(g):
        return g * tf.cast(x > 0, g.dtype)

    return tf.nn.relu(x), backward


@tf.custom_gradient
def sigmoid(x):
    y = tf.math.sigmoid(x)

    def backward(g):
        return g * y * (1.0 - y)

    return y, backward


@tf.custom_gradient
def tanh(x):
    y = tf.math.tanh(x)

    def backward(g):
        return g * (1.0 - y * y)

    return y, backward


def _mask(condition, like):
    return tf.cast(condition, like.dtype)


@tf.custom_gradient
def relu6(x):
    y = tf.nn.relu6(x)

    def backward(g):
        # Relu6Grad: the gradient passes strictly inside (0, 6).
        return g * _mask(tf.logical_and(x > 0, x < 6), g)

    return y, backward


def keras_relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    """`keras.activations.relu` with all its options (the `ReLU` layer), computed
    as Keras computes it, with TensorFlow's gradient at every kink."""
    if not negative_slope and not threshold:
        if max_value is None:
            return relu(x)
        if max_value == 6:
            return relu6(x)
    slope, top, threshold = float(negative_slope), max_value, float(threshold)

    @tf.custom_gradient
    def forward(x):
        if slope and top is None and not threshold:
            def leaky_backward(g):
                return tf.where(x > 0, g, g * slope)  # LeakyReluGrad

            return tf.nn.leaky_relu(x, alpha=slope), leaky_backward
        # The same steps as Keras's ReLU.static_call.
        if threshold:
            passes = _mask(x > threshold, x)
            y = tf.where(x > threshold, x, tf.zeros_like(x))
            clip = top is not None
        elif top == 6:
            y, passes, clip = tf.nn.relu6(x), _mask(tf.logical_and(x > 0, x < 6), x), False
        else:
            y, passes, clip = tf.nn.relu(x), _mask(x > 0, x), top is not None
        if clip:
            # clip_by_value's gradient passes at the bounds themselves.
            # (A negative threshold lets values below 0 through to the clip.)
            passes = passes * _mask(tf.logical_and(y >= 0, y <= float(top)), x)
            y = tf.minimum(tf.maximum(y, 0.0), float(top))
        below = None
        if slope:
            negative = threshold - x if threshold else -x
            below = _mask(negative > 0, x)
            y = y - slope * tf.nn.relu(negative)

        def backward(g):
            dx = g * passes
            return dx if below is None else dx + slope * (g * below)

        return y, backward

    return forward(x)


@tf.custom_gradient
def hard_sigmoid(x):
    """`relu6(x + 3) / 6`, as Keras computes it."""
    shifted = x + 3.0
    y = tf.nn.relu6(shifted) / 6.0

    def backward(g):
        return (g / 6.0) * _mask(tf.logical_and(shifted > 0, shifted < 6), g)

    return y, backward


@tf.custom_gradient
def hard_silu(x):
    """Hard swish, `x * relu6(x + 3) / 6`, as Keras computes it."""
    shifted = x + 3.0
    gate = tf.nn.relu6(shifted) / 6.0

    def backward(g):
        inside = _mask(tf.logical_and(shifted > 0, shifted < 6), g)
        return g * gate + (g * x / 6.0) * inside

    return x * gate, backward


@tf.custom_gradient
def silu(x):
    """Swish, `x * sigmoid(x)`, with `tf.nn.silu`'s own gradient formula."""
    s = tf.math.sigmoid(x)

    def backward(g):
        return g * (s * (1.0 + x * (1.0 - s)))

    return x * s, backward


@tf.custom_gradient
def softmax(x):
    """Softmax over the last axis."""
    y = tf.nn.softmax(x)

    def backward(g):
        return (g - tf.reduce_sum(g * y, axis=-1, keepdims=True)) * y

    return y, backward


def _unbroadcast(g, shape):
    """Sum `g` over the axes a tensor of `shape` was broadcast along."""
    axes = [a for a in range(1, len(g.shape)) if shape[a] == 1 and g.shape[a] != 1]
    return tf.reduce_sum(g, axis=axes, keepdims=True) if axes else g


def add(tensors):
    """Elementwise sum of same-rank tensors, broadcasting along size-1 axes."""
    shapes = [t.shape for t in tensors]

    @tf.custom_gradient
    def forward(*tensors):
        y = tensors[0]
        for t in tensors[1:]:
            y = y + t

        def backward(g):
            return tuple(_unbroadcast(g, shape) for shape in shapes)

        return y, backward

    return forward(*tensors)


def multiply(tensors):
    """Elementwise product of same-rank tensors, broadcasting along size-1 axes
    (a squeeze-and-excitation block scales [B, H, W, C] by [B, 1, 1, C])."""
    shapes = [t.shape for t in tensors]

    @tf.custom_gradient
    def forward(*tensors):
        y = tensors[0]
        for t in tensors[1:]:
            y = y * t

        def backward(g):
            grads = []
            for i, shape in enumerate(shapes):
                others = [t for j, t in enumerate(tensors) if j != i]
                product = others[0]
                for t in others[1:]:
                    product = product * t
                grads.append(_unbroadcast(g * product, shape))
            return tuple(grads)

        return y, backward

    return forward(*tensors)


def scalar(x, operation, constant, constant_first=False):
    """`x <op> constant` (or `constant <op> x`) for op in + - * /: what Python
    arithmetic on a symbolic Keras tensor leaves in the graph."""
    c = float(constant)

    @tf.custom_gradient
    def forward(x):
        if operation == "add":
            y = c + x if constant_first else x + c
        elif operation == "subtract":
            y = c - x if constant_first else x - c
        elif operation == "multiply":
            y = c * x if constant_first else x * c
        else:
            y = c / x if constant_first else x / c

        def backward(g):
            if operation == "add":
                return g
            if operation == "subtract":
                return -g if constant_first else g
            if operation == "multiply":
                return g * c
            return -g * c / (x * x) if constant_first else g / c

        return y, backward

    return forward(x)


def _interleave(parts, pool, x_shape):
    """Inverse of taking `x[:, i::ph, j::pw]` for each window position (i, j):
    put each part back at its positions; rows and columns pooling dropped get 0."""
    ph, pw = pool
    oh, ow, channels = parts[0].shape[1], parts[0].shape[2], x_shape[3]
    if ph == pw and _lite():
        # Channels ordered (i, j, c) are what depth_to_space spreads over a block.
        return _pad_to(tf.nn.depth_to_space(tf.concat(parts, axis=3), ph), x_shape)
    rows = []
    for i in range(ph):
        row = tf.stack(parts[i * pw: (i + 1) * pw], axis=3)  # [B, oh, ow, pw, C]
        rows.append(tf.reshape(row, [-1, oh, ow * pw, channels]))
    full = tf.reshape(tf.stack(rows, axis=2), [-1, oh * ph, ow * pw, channels])
    return _pad_to(full, x_shape)


def _pad_to(full, x_shape):
    """Zero rows and columns for what pooling dropped at the bottom and right."""
    extra_rows, extra_cols = x_shape[1] - full.shape[1], x_shape[2] - full.shape[2]
    if extra_rows or extra_cols:
        full = tf.pad(full, [[0, 0], [0, extra_rows], [0, extra_cols], [0, 0]])
    return full


def _windows(x, pool):
    """The values at each window position (i, j), row-major: [B, oh, ow, C] each."""
    ph, pw = pool
    oh, ow, channels = x.shape[1] // ph, x.shape[2] // pw, x.shape[3]
    kept = x[:, : oh * ph, : ow * pw, :]
    if ph == pw and _lite():
        # space_to_depth lays each window along the channels as (i, j, c).
        blocks = tf.nn.space_to_depth(kept, ph)
        return [blocks[..., k * channels: (k + 1) * channels] for k in range(ph * pw)]
    return [kept[:, i::ph, j::pw, :] for i in range(ph) for j in range(pw)]


def max_pool(x, pool, strides=None, padding="VALID", relu=False):
    """Max pooling; non-overlapping VALID windows take the fast path below.

    `relu=True` computes `max_pool(relu(x))` as `relu(max_pool(x))` (the same
    values, ties included): the ReLU and its gradient mask then work on the
    pooled tensor, a quarter of the size for 2x2 windows.
    """
    pool, strides, padding = tuple(pool), tuple(strides or pool), padding.upper()
    if _RUNTIME.get() == "frozen":
        # Inference only: the ReLU back before the pool, where the converter
        # fuses it into the convolution.
        return tf.nn.max_pool2d(tf.nn.relu(x) if relu else x, pool, strides, padding)
    if strides != pool or padding != "VALID":
        y = _max_pool_general(x, pool, strides, padding)
        return _relu(y) if relu else y

    @tf.custom_gradient
    def forward(x):
        if _lite():
            # The builtin pooling op forward; the windows only for the backward pass.
            m, windows = tf.nn.max_pool2d(x, pool, pool, "VALID"), None
        else:
            # ONNX's MaxPool is NCHW: the converter would keep the layers
            # around it in NCHW and transpose where it is costliest (after an
            # im2col). The maximum of the window views stays NHWC.
            windows = _windows(x, pool)
            m = windows[0]
            for window in windows[1:]:
                m = tf.maximum(m, window)
        y = tf.nn.relu(m) if relu else m

        def backward(g):
            if relu:
                # A window whose maximum is not positive was all zeros after
                # the ReLU: its first position took a zero gradient.
                g = g * tf.cast(m > 0, g.dtype)
            # The whole gradient goes to the first maximum of each window. In
            # float arithmetic (faster than boolean ops in LiteRT): `free` is 1
            # until a window position has taken the gradient; the last
            # position takes whatever is left (a window always has its maximum).
            free, parts = None, []
            for k, window in enumerate(windows or _windows(x, pool)):
                if k == pool[0] * pool[1] - 1:
                    parts.append(g if free is None else g * free)
                    break
                equal = tf.cast(tf.equal(window, m), g.dtype)
                share = equal if free is None else free * equal
                free = 1.0 - share if free is None else free - share
                parts.append(g * share)
            return _interleave(parts, pool, x.shape)

        return y, backward

    return forward(x)


def _place(part, offset, strides, padded_hw):
    """Put the window position `offset`'s values back where they came from in
    the padded input (the inverse of a strided slice), zeros elsewhere."""
    part = _dilate(part, strides)
    (i, j), (rows, cols) = offset, padded_hw
    return tf.pad(part, [[0, 0], [i, rows - i - part.shape[1]], [j, cols - j - part.shape[2]],
                         [0, 0]])


def _max_pool_general(x, pool, strides, padding):
    """Overlapping or SAME max pooling: each window's gradient goes to its first
    maximum in row-major order (as `MaxPoolGrad`); overlapping windows add up."""
    (top, bottom), (left, right) = _pads(x.shape, pool, strides, padding)

    @tf.custom_gradient
    def forward(x):
        y = tf.nn.max_pool2d(x, pool, strides, padding)

        def backward(g):
            padded = x
            if top or bottom or left or right:
                # SAME windows never take a padded position: pad with the lowest float.
                padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]],
                                constant_values=x.dtype.min)
            hw = padded.shape[1:3]
            windows = _patches(padded, pool, y.shape[1:3], strides, "VALID")
            free, total = tf.ones_like(g), None
            for k, window in enumerate(windows):
                share = free * _mask(tf.equal(window, y), g)
                free = free - share
                part = _place(g * share, divmod(k, pool[1]), strides, hw)
                total = part if total is None else total + part
            return total[:, top: top + x.shape[1], left: left + x.shape[2], :]

        return y, backward

    return forward(x)


def _window_counts(x_shape, pool, strides, padding):
    """How many input positions each output window averages (SAME windows at the
    border hold fewer), as a [1, oh, ow, 1] constant."""
    counts = []
    for axis in range(2):
        size, kernel, stride = x_shape[axis + 1], pool[axis], strides[axis]
        before = _pads(x_shape, pool, strides, padding)[axis][0]
        out = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
        starts = np.arange(out) * stride - before
        counts.append(np.minimum(starts + kernel, size) - np.maximum(starts, 0))
    return tf.constant(np.outer(*counts).astype("float32")[None, :, :, None])


def average_pool(x, pool, strides=None, padding="VALID"):
    """Average pooling; non-overlapping VALID windows take the fast path below."""
    pool, strides, padding = tuple(pool), tuple(strides or pool), padding.upper()
    if strides != pool or padding != "VALID":
        return _average_pool_general(x, pool, strides, padding)
    count = float(pool[0] * pool[1])

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            return _interleave([g / count] * int(count), pool, x.shape)

        return tf.add_n(_windows(x, pool)) / count, backward

    return forward(x)


def _average_pool_general(x, pool, strides, padding):
    """Overlapping or SAME average pooling. Its gradient is a depthwise
    convolution's input gradient with a kernel of ones, applied to the output
    gradient divided by each window's count (`AvgPoolGrad`)."""
    counts = _window_counts(x.shape, pool, strides, padding)
    ones = tf.ones([pool[0], pool[1], x.shape[3], 1], x.dtype)

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            return _depthwise_input_gradient(g / counts, ones, x.shape, strides, padding)

        return tf.nn.avg_pool2d(x, pool, strides, padding), backward

    return forward(x)


def global_average_pool(x, keepdims=False):
    """The mean over height and width (`GlobalAveragePooling2D`)."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    count = float(height * width)

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            g = tf.reshape(g, [-1, 1, 1, channels]) / count
            return tf.tile(g, [1, height, width, 1])

        return tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims), backward

    return forward(x)


def zero_pad(x, padding):
    """`ZeroPadding2D`: padding is ((top, bottom), (left, right))."""
    (top, bottom), (left, right) = padding
    height, width = x.shape[1], x.shape[2]

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            return g[:, top: top + height, left: left + width, :]

        return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]]), backward

    return forward(x)


def reshape(x, shape):
    """Reshape every sample to `shape` (without the batch axis, fully known)."""
    source = list(x.shape[1:])

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            return tf.reshape(g, [-1, *source])

        return tf.reshape(x, [-1, *shape]), backward

    return forward(x)


def batch_norm_train(x, gamma, beta, epsilon):
    """Batch normalization with batch statistics over all axes but the last.

    Returns the output, the batch mean and the (biased) batch variance. The
    forward pass is Keras's arithmetic, operation for operation (`tf.nn.moments`,
    then `tf.nn.batch_normalization`): the same values as the Keras client, so
    no activation lands on the other side of a ReLU kink for rounding alone.
    """
    axes = list(range(len(x.shape) - 1))

    @tf.custom_gradient
    def forward(x, gamma, beta):
        if _lite():
            mean = tf.reduce_mean(x, axis=axes)
            variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=axes)
        else:  # onnxruntime: in stages, as sum_to_channels
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            mean = sum_to_channels(x) / count
            variance = sum_to_channels(tf.math.squared_difference(x, mean)) / count
        y = _normalize(x, mean, variance, gamma, beta, epsilon)

        def backward(g, _mean_gradient, _variance_gradient):
            # The statistics feed only the moving averages, which take no
            # gradient; the closed form below is d(loss)/dx through y.
            inverse = tf.math.rsqrt(variance + epsilon)
            normalized = (x - mean) * inverse
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            dnormalized = g * gamma
            sum_d = sum_to_channels(dnormalized)
            sum_dn = sum_to_channels(dnormalized * normalized)
            dx = inverse / count * (count * dnormalized - sum_d - normalized * sum_dn)
            return dx, sum_to_channels(g * normalized), sum_to_channels(g)

        return (y, mean, variance), backward

    return forward(x, gamma, beta)


def _normalize(x, mean, variance, gamma, beta, epsilon):
    # tf.nn.batch_normalization's arithmetic: one multiply and one add per value.
    inverse = tf.math.rsqrt(variance + epsilon) * gamma
    return x * inverse + (beta - mean * inverse)


def batch_norm_infer(x, gamma, beta, mean, variance, epsilon):
    return _normalize(x, mean, variance, gamma, beta, epsilon)


@tf.custom_gradient
def flatten(x):
    shape = tf.shape(x)
    size = 1
    for d in x.shape[1:]:
        size *= d

    def backward(g):
        return tf.reshape(g, shape)

    return tf.reshape(x, [-1, size]), backward


def concatenate(tensors, axis):
    sizes = [t.shape[axis] for t in tensors]

    @tf.custom_gradient
    def forward(*tensors):
        def backward(g):
            return tuple(tf.split(g, sizes, axis=axis))

        return tf.concat(tensors, axis=axis), backward

    return forward(*tensors)


_relu = relu  # for max_pool, whose argument of that name shadows it
