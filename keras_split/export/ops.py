"""Differentiable ops whose gradients use forward ops only.

TensorFlow's own gradients of convolution, pooling and ReLU are dedicated
kernels (`Conv2DBackpropFilter`, `MaxPoolGrad`, `ReluGrad`, ...) that neither
the plain LiteRT runtime nor ONNX has. Each op here has a `tf.custom_gradient`
written with ops both can run: convolutions, strided slices, matmuls,
comparisons, pads and reshapes. Spatial sizes are static (known from the
model); the batch size stays dynamic.

Every gradient here matches TensorFlow's own to float32 rounding, including
max-pool ties, which go to the first maximum of each window in row-major
order, as `MaxPoolGrad` does (tests compare them).
"""

from __future__ import annotations

import tensorflow as tf


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


def conv2d(x, kernel, strides=(1, 1), padding="VALID"):
    """NHWC convolution (no dilation, one group)."""
    strides, padding = tuple(strides), padding.upper()

    @tf.custom_gradient
    def forward(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, padding)

        def backward(g):
            return _conv_input_gradient(g, kernel, x.shape, strides, padding), \
                _conv_kernel_gradient(x, g, kernel.shape, strides, padding)

        return y, backward

    return forward(x, kernel)


def _conv_input_gradient(g, kernel, x_shape, strides, padding):
    # dx_padded = full correlation of the dilated gradient with the kernel
    # flipped in space and transposed in channels; then crop the padding.
    kh, kw = kernel.shape[0], kernel.shape[1]
    (top, bottom), (left, right) = _pads(x_shape, (kh, kw), strides, padding)
    flipped = tf.transpose(kernel[::-1, ::-1], [0, 1, 3, 2])
    d = _dilate(g, strides)
    rows = x_shape[1] + top + bottom - (d.shape[1] + kh - 1)
    cols = x_shape[2] + left + right - (d.shape[2] + kw - 1)
    d = tf.pad(d, [[0, 0], [kh - 1, kh - 1 + rows], [kw - 1, kw - 1 + cols], [0, 0]])
    full = tf.nn.conv2d(d, flipped, (1, 1), "VALID")
    return full[:, top: top + x_shape[1], left: left + x_shape[2], :]


def _conv_kernel_gradient(x, g, kernel_shape, strides, padding):
    # dK[i, j] = sum over batch and positions of x_patch(i, j)^T g: one matmul
    # over the patches gathered by strided slices (im2col).
    kh, kw, cin, cout = kernel_shape
    (top, bottom), (left, right) = _pads(x.shape, (kh, kw), strides, padding)
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    oh, ow = g.shape[1], g.shape[2]
    patches = [
        x[:, i: i + (oh - 1) * strides[0] + 1: strides[0],
          j: j + (ow - 1) * strides[1] + 1: strides[1], :]
        for i in range(kh) for j in range(kw)
    ]
    columns = tf.reshape(tf.stack(patches, axis=3), [-1, kh * kw * cin])
    gradient = tf.matmul(columns, tf.reshape(g, [-1, cout]), transpose_a=True)
    return tf.reshape(gradient, [kh, kw, cin, cout])


@tf.custom_gradient
def bias_add(x, bias):
    def backward(g):
        axes = list(range(len(g.shape) - 1))
        return g, tf.reduce_sum(g, axis=axes)

    return x + bias, backward


@tf.custom_gradient
def matmul(x, kernel):
    def backward(g):
        return tf.matmul(g, kernel, transpose_b=True), tf.matmul(x, g, transpose_a=True)

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


def _interleave(parts, pool, x_shape):
    """Inverse of taking `x[:, i::ph, j::pw]` for each window position (i, j):
    put each part back at its positions; rows and columns pooling dropped get 0."""
    ph, pw = pool
    oh, ow, channels = parts[0].shape[1], parts[0].shape[2], x_shape[3]
    if ph == pw:
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
    ph, pw = pool
    oh, ow = x.shape[1] // ph, x.shape[2] // pw
    kept = x[:, : oh * ph, : ow * pw, :]
    return [kept[:, i::ph, j::pw, :] for i in range(ph) for j in range(pw)]


def max_pool(x, pool):
    """Non-overlapping max pooling (strides equal to the pool size, VALID)."""

    @tf.custom_gradient
    def forward(x):
        # The builtin pooling op forward (fast everywhere); the windows only
        # for the backward pass.
        y = tf.nn.max_pool2d(x, pool, pool, "VALID")

        def backward(g):
            # The whole gradient goes to the first maximum of each window. In
            # float arithmetic (faster than boolean ops in LiteRT): `free` is 1
            # until a window position has taken the gradient.
            if pool[0] != pool[1]:
                free, parts = tf.ones_like(g), []
                for window in _windows(x, pool):
                    share = free * tf.cast(tf.equal(window, y), g.dtype)
                    free = free - share
                    parts.append(g * share)
                return _interleave(parts, pool, x.shape)
            # Square windows: space_to_depth lays each window along the channels
            # as (i, j, c), so one comparison covers the whole tensor.
            size, channels = pool[0] * pool[1], x.shape[3]
            kept = x[:, : y.shape[1] * pool[0], : y.shape[2] * pool[1], :]
            blocks = tf.nn.space_to_depth(kept, pool[0])
            equal = tf.cast(tf.equal(blocks, tf.tile(y, [1, 1, 1, size])), g.dtype)
            free, shares = tf.ones_like(g), []
            for k in range(size):
                share = free * equal[..., k * channels: (k + 1) * channels]
                free = free - share
                shares.append(share)
            spread = tf.concat(shares, axis=3) * tf.tile(g, [1, 1, 1, size])
            return _pad_to(tf.nn.depth_to_space(spread, pool[0]), x.shape)

        return y, backward

    return forward(x)


def average_pool(x, pool):
    """Non-overlapping average pooling (strides equal to the pool size, VALID)."""
    count = float(pool[0] * pool[1])

    @tf.custom_gradient
    def forward(x):
        def backward(g):
            return _interleave([g / count] * int(count), pool, x.shape)

        return tf.add_n(_windows(x, pool)) / count, backward

    return forward(x)


def batch_norm_train(x, gamma, beta, epsilon):
    """Batch normalization with batch statistics over all axes but the last.

    Returns the output, the batch mean and the (biased) batch variance.
    """
    axes = list(range(len(x.shape) - 1))

    @tf.custom_gradient
    def forward(x, gamma, beta):
        mean = tf.reduce_mean(x, axis=axes)
        centered = x - mean
        variance = tf.reduce_mean(centered * centered, axis=axes)
        inverse = tf.math.rsqrt(variance + epsilon)
        normalized = centered * inverse
        y = normalized * gamma + beta

        def backward(g, _mean_gradient, _variance_gradient):
            # The statistics feed only the moving averages, which take no
            # gradient; the closed form below is d(loss)/dx through y.
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            dnormalized = g * gamma
            sum_d = tf.reduce_sum(dnormalized, axis=axes)
            sum_dn = tf.reduce_sum(dnormalized * normalized, axis=axes)
            dx = inverse / count * (count * dnormalized - sum_d - normalized * sum_dn)
            return dx, tf.reduce_sum(g * normalized, axis=axes), tf.reduce_sum(g, axis=axes)

        return (y, mean, variance), backward

    return forward(x, gamma, beta)


def batch_norm_infer(x, gamma, beta, mean, variance, epsilon):
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


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
