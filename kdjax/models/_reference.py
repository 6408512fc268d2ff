"""Small reference models (linen) used by the main job, tests and benchmarks."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn


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
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.dense, use_bias=not self.batch_norm, dtype=self.dtype,
                 name="dense")(x)
    x = nn.relu(self._norm(x, train, "bn_dense"))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    self.sow("intermediates", "penultimate", x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
