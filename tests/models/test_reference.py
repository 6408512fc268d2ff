"""The reference models' pooling: ``max_pool_2x2`` against ``nn.max_pool`` and NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models


def _numpy_pool(x: np.ndarray) -> np.ndarray:
  """Independent reference: the max of each 2x2 window, stride 2, VALID."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("shape", [(3, 28, 28, 8), (2, 7, 9, 3), (1, 2, 2, 1)])
def test_values_equal_numpy_and_flax(shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(jax.jit(models.max_pool_2x2)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, _numpy_pool(x))
  np.testing.assert_array_equal(got, np.asarray(
      nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2))))


def test_gradient_equals_flax_without_ties():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 8, 4)),
                  jnp.float32)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4, 4)),
                    jnp.float32)
  ours = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) * cot))(x)
  flax = jax.grad(lambda v: jnp.sum(
      nn.max_pool(v, (2, 2), strides=(2, 2)) * cot))(x)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))
  # Each window passes its cotangent to its arg-max only.
  assert int(jnp.sum(ours != 0)) == cot.size


def test_gradient_equals_flax_with_ties():
  """Ties (black image background: equal ReLU outputs) route like nn.max_pool."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.integers(0, 3, size=(2, 8, 6, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 4, 3, 3)), jnp.float32)
  ours = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) * cot))(x)
  flax = jax.grad(lambda v: jnp.sum(
      nn.max_pool(v, (2, 2), strides=(2, 2)) * cot))(x)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))
  tied = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v)))(jnp.ones((1, 2, 2, 1)))
  np.testing.assert_array_equal(np.asarray(tied)[0, :, :, 0], [[1, 0], [0, 0]])


def test_odd_sizes_and_second_order_shapes():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, 9, 3)), jnp.float32)
  g = jax.jit(jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) ** 2)))(x)
  f = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) ** 2))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(f), rtol=1e-6)
  assert g.shape == x.shape and float(jnp.abs(g[:, 6]).max()) == 0.0


def test_cnn_uses_it_and_matches_flax_pooling():
  """The CNN's logits equal those of the same network with nn.max_pool."""
  cnn = models.CNN(channels=(4, 8), dense=16, num_classes=10)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 28, 28, 1)),
                  jnp.float32)
  variables = cnn.init(jax.random.PRNGKey(0), x)
  p = variables["params"]

  def reference(x):
    for i in range(2):
      k, b = p[f"conv_{i}"]["kernel"], p[f"conv_{i}"]["bias"]
      x = jax.lax.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(x.reshape(x.shape[0], -1) @ p["dense"]["kernel"]
                + p["dense"]["bias"])
    return x @ p["head"]["kernel"] + p["head"]["bias"]

  np.testing.assert_allclose(np.asarray(cnn.apply(variables, x)),
                             np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_forward_mode_equals_flax():
  """jax.jvp works (a custom JVP, so jacfwd and hessians work too)."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.integers(0, 3, size=(1, 4, 4, 2)), jnp.float32)
  t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  _, ours = jax.jvp(models.max_pool_2x2, (x,), (t,))
  _, flax = jax.jvp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)), (x,), (t,))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))
