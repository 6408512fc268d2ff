"""Small reference models (linen) used by the main job, tests and benchmarks."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_jvp
def _pool_even(x):
  top = jnp.maximum(x[..., 0::2, 0::2, :], x[..., 0::2, 1::2, :])
  bottom = jnp.maximum(x[..., 1::2, 0::2, :], x[..., 1::2, 1::2, :])
  return jnp.maximum(top, bottom)


@_pool_even.defjvp
def _pool_even_jvp(primals, tangents):
  # The tangent of each window is that of its first maximum in row-major
  # order; transposed (reverse mode), the whole cotangent goes there, as
  # XLA's select-and-scatter (nn.max_pool's gradient) gives it.
  (x,), (t,) = primals, tangents
  y = _pool_even(x)
  taken = jnp.zeros(y.shape, bool)
  out = jnp.zeros_like(y)
  for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
    hit = (x[..., i::2, j::2, :] == y) & ~taken
    taken = taken | hit
    out = jnp.where(hit, t[..., i::2, j::2, :], out)
  return y, out


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, NHWC: ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

  The same values and the same gradient (an odd last row or column is
  dropped, as with VALID padding; in a window with equal maxima the first one
  in row-major order takes the whole cotangent, as with XLA's
  select-and-scatter), computed with strided slices and elementwise selects:
  on XLA:CPU the backward pass takes 0.16 instead of 3.5 ms on
  ``[128, 28, 28, 8]`` and 1.6 instead of 39 ms on ``[128, 28, 28, 32]``
  (``benchmarks/bench_pool.py``). A custom JVP: forward and reverse mode.
  """
  h, w = (x.shape[-3] // 2) * 2, (x.shape[-2] // 2) * 2
  return _pool_even(x[..., :h, :w, :])


class MLP(nn.Module):
  """A ReLU MLP on flattened inputs; hidden layers are named ``dense_0``, ...

  The penultimate activation is sown as ``"penultimate"`` (the embedding used
  by relational and contrastive methods).
  """
  hidden: Sequence[int] = (800, 800)
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: Optional[Any] = None  # None: compute in the inputs'/params' dtype

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    self.sow("intermediates", "penultimate", x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class CNN(nn.Module):
  """A small VGG-style CNN for 28x28 (or any HxW) images, NHWC.

  Convolution blocks are named ``conv_0``, ``conv_1``, ... (their ReLU
  outputs, before pooling, are sown under the same names ``block_0``, ...);
  the penultimate dense activation is sown as ``"penultimate"``.

  With ``batch_norm`` every convolution (then bias-free) and the dense layer
  are followed by ``BatchNorm`` (``bn_<i>``, ``bn_dense``; running statistics
  in the ``batch_stats`` collection, updated when ``train=True``), as in the
  project's Fashion-MNIST teacher (``experiments/fashion_mnist_teacher.py``).
  """
  channels: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10
  dropout_rate: float = 0.0
  batch_norm: bool = False
  dtype: Optional[Any] = None  # None: compute in the inputs'/params' dtype

  def _norm(self, x, train: bool, name: str):
    if not self.batch_norm:
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if x.ndim == 3:
      x = x[..., None]
    for i, ch in enumerate(self.channels):
      x = nn.Conv(ch, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype,
                  name=f"conv_{i}")(x)
      x = nn.relu(self._norm(x, train, f"bn_{i}"))
      self.sow("intermediates", f"block_{i}", x)
      x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.dense, use_bias=not self.batch_norm, dtype=self.dtype,
                 name="dense")(x)
    x = nn.relu(self._norm(x, train, "bn_dense"))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    self.sow("intermediates", "penultimate", x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
