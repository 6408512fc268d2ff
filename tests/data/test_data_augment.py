"""Batch augmentations shared by teacher and student (consistent teaching)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import augment as aug

B, H, W, C = 6, 5, 4, 2


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(B, H, W, C)),
                     jnp.float32)


def test_shapes_and_dtypes_preserved(images):
  key = jax.random.key(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = images.astype(dtype)
    for out in (aug.random_crop(key, x, 2), aug.random_flip(key, x),
                aug.mixup(key, x, 0.4),
                aug.augment(key, x, crop_padding=1, mixup_alpha=1.0)):
      chex.assert_shape(out, (B, H, W, C))
      assert out.dtype == dtype


def test_same_rng_same_views_for_teacher_and_student(images):
  key = jax.random.key(3)
  kw = dict(crop_padding=2, flip=True, mixup_alpha=1.0)
  batch = {"image": images, "label": jnp.arange(B), "index": jnp.arange(B) + 7}
  shared = aug.augment_batch(key, batch, **kw)
  # The student's view (re-derived from the same key) equals the teacher's.
  student_view = aug.augment(key, images, **kw)
  np.testing.assert_array_equal(np.asarray(shared["image"]),
                                np.asarray(student_view))
  assert shared["label"] is batch["label"] and shared["index"] is batch["index"]
  other = aug.augment(jax.random.key(4), images, **kw)
  assert not np.allclose(np.asarray(other), np.asarray(student_view))
  with pytest.raises(KeyError, match="'pixels'"):
    aug.augment_batch(key, batch, image_key="pixels")


def test_random_crop_is_a_window_of_the_padded_image(images):
  x = np.asarray(images)
  p, fill = 2, -1.5
  out = np.asarray(aug.random_crop(jax.random.key(1), images, p, fill))
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
  offsets = []
  for b in range(B):
    hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            if np.array_equal(out[b], padded[b, dy:dy + H, dx:dx + W])]
    assert hits, f"example {b} is not a crop of its padded image"
    offsets.append(hits[0])
  assert len(set(offsets)) > 1  # offsets drawn per example.
  np.testing.assert_array_equal(
      np.asarray(aug.random_crop(jax.random.key(1), images, 0)), x)
  with pytest.raises(ValueError, match="padding"):
    aug.random_crop(jax.random.key(1), images, -1)


def test_random_flip_mirrors_or_keeps(images):
  x = np.asarray(images)
  out = np.asarray(aug.random_flip(jax.random.key(2), images))
  kinds = []
  for b in range(B):
    if np.array_equal(out[b], x[b]):
      kinds.append("same")
    else:
      np.testing.assert_array_equal(out[b], x[b, :, ::-1])
      kinds.append("flip")
  np.testing.assert_array_equal(
      np.asarray(aug.random_flip(jax.random.key(2), images, prob=1.0)),
      x[:, :, ::-1])
  np.testing.assert_array_equal(
      np.asarray(aug.random_flip(jax.random.key(2), images, prob=0.0)), x)
  many = np.asarray(aug.random_flip(jax.random.key(5), jnp.tile(images, (20, 1,
                                                                       1, 1))))
  flipped = [not np.array_equal(m, t) for m, t in zip(many, np.tile(x, (20, 1,
                                                                      1, 1)))]
  assert 0.3 < np.mean(flipped) < 0.7
  with pytest.raises(ValueError, match="prob"):
    aug.random_flip(jax.random.key(2), images, prob=1.5)
  with pytest.raises(ValueError, match="NHWC"):
    aug.random_flip(jax.random.key(2), images[0])


def test_mixup_is_a_convex_mix_with_the_rolled_batch(images):
  x = np.asarray(images, np.float64)
  key = jax.random.key(6)
  out = np.asarray(aug.mixup(key, images, alpha=0.7), np.float64)
  partner = np.roll(x, 1, axis=0)
  # Solve out = lam * x + (1 - lam) * partner for one lam by least squares.
  d = (x - partner).ravel()
  lam = float(d @ (out - partner).ravel() / (d @ d))
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(out, lam * x + (1 - lam) * partner, atol=1e-5)
  np.testing.assert_allclose(lam, float(aug.mixup_weight(key, 0.7)), atol=1e-5)
  # Beta(1, 1) is uniform: mean 1/2, variance 1/12.
  lams = np.asarray(jax.vmap(aug.mixup_weight)(
      jax.random.split(jax.random.key(0), 2000)))
  assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 1 / 12) < 0.01
  with pytest.raises(ValueError, match="alpha"):
    aug.mixup(key, images, alpha=0.0)


def test_jit_matches_eager_and_grad_is_finite(images):
  key = jax.random.key(8)
  fn = functools.partial(aug.augment, crop_padding=1, mixup_alpha=1.0)
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(key, images)),
                             np.asarray(fn(key, images)), atol=1e-5)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(key, x) ** 2)))(images)
  assert bool(jnp.all(jnp.isfinite(grad)))
  # Per-example vmap over keys is fine too (one key per device shard).
  keys = jax.random.split(key, 2)
  out = jax.vmap(lambda k, x: aug.random_crop(k, x, 1))(
      keys, images.reshape(2, B // 2, H, W, C))
  chex.assert_shape(out, (2, B // 2, H, W, C))
