"""Batch augmentations for distillation, shared by teacher and student.

Beyer et al. 2022 ("Knowledge distillation: A good teacher is patient and
consistent", CVPR, arXiv:2106.05237) find that distillation works best when
teacher and student see *the same* augmented view of each image ("consistent
teaching"), with strong augmentation such as mixup applied to that shared view
("function matching": the student matches the teacher's function on the
augmented/mixed inputs, with no labels involved).

So these functions are applied **once per batch, before both models**::

  batch = augment_batch(step_rng, batch, crop_padding=4, flip=True,
                        mixup_alpha=1.0)
  teacher_out = teacher_apply(teacher_variables, batch)
  student_out = student_apply(student_variables, batch, train=True)

rather than once inside each model's forward pass (which would show the two
models different crops). Each is a pure function of ``(rng, images)``: the
same ``rng`` gives the same output, so re-applying it with the same key
(e.g. once for a teacher whose outputs are cached and once for the student)
also gives identical views. All are jit/vmap/grad-safe; ``images`` are NHWC
``[B, H, W, C]`` and keep their shape and dtype.

After mixup the integer ``"label"`` describes neither image alone: use a
label-free (function-matching) loss, or mix one-hot labels with
:func:`mixup_weight` (same ``rng``) and the same partner (``jnp.roll(.., 1,
axis=0)``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp


def _check_images(images: chex.Array, name: str) -> None:
  if images.ndim != 4:
    raise ValueError(f"{name} expects NHWC images [B, H, W, C], got shape "
                     f"{images.shape}.")


def random_crop(rng: chex.PRNGKey,
                images: chex.Array,
                padding: int = 4,
                fill: float = 0.0) -> chex.Array:
  """Pads by ``padding`` pixels and crops a random ``H x W`` window per image.

  ``out[b] = pad(images[b], padding, fill)[dy_b : dy_b + H, dx_b : dx_b + W]``
  with ``dy_b, dx_b ~ Uniform{0, ..., 2 * padding}`` independently per image
  (the CIFAR "random crop with padding" of He et al. 2016, Sec. 4.2).

  Args:
    rng: PRNG key.
    images: ``[B, H, W, C]``.
    padding: pixels added on each side (``0``: identity).
    fill: value of the padded pixels, in the images' units (after
      normalisation ``(x - mean) / std``, black is ``-mean / std``).

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  _check_images(images, "random_crop")
  if int(padding) != padding or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding}.")
  if padding == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)), constant_values=fill)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(rng: chex.PRNGKey,
                images: chex.Array,
                prob: float = 0.5) -> chex.Array:
  """Mirrors each image left-right with probability ``prob``.

  ``out[b] = images[b, :, ::-1]`` if ``u_b < prob`` else ``images[b]``,
  ``u_b ~ Uniform[0, 1)``.

  Args:
    rng: PRNG key.
    images: ``[B, H, W, C]``.
    prob: flip probability in ``[0, 1]``.

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  _check_images(images, "random_flip")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob must lie in [0, 1], got {prob}.")
  flip = jax.random.uniform(rng, (images.shape[0],)) < prob
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def mixup_weight(rng: chex.PRNGKey, alpha: float = 1.0) -> chex.Array:
  """The mixing weight ``lam ~ Beta(alpha, alpha)`` that :func:`mixup` uses.

  Returns a float32 scalar in ``[0, 1]``.
  """
  if not alpha > 0:
    raise ValueError(f"mixup alpha must be positive, got {alpha}.")
  return jax.random.beta(rng, alpha, alpha, dtype=jnp.float32)


def mixup(rng: chex.PRNGKey,
          images: chex.Array,
          alpha: float = 1.0) -> chex.Array:
  """Mixes each image with its neighbour in the batch (function matching).

  ``out = lam * images + (1 - lam) * roll(images, 1, axis=0)`` with one
  ``lam = mixup_weight(rng, alpha) ~ Beta(alpha, alpha)`` per batch: the
  mixup of Zhang et al. 2018 (arXiv:1710.09412) in the batch-rolled form of
  big_vision, used by Beyer et al. 2022 on the view shared by teacher and
  student. Computed in float32.

  Args:
    rng: PRNG key.
    images: ``[B, H, W, C]``.
    alpha: Beta concentration (``1.0``: ``lam`` uniform on ``[0, 1]``).

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  _check_images(images, "mixup")
  lam = mixup_weight(rng, alpha)
  x = images.astype(jnp.float32)
  mixed = lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)
  return mixed.astype(images.dtype)


def augment(rng: chex.PRNGKey,
            images: chex.Array,
            *,
            crop_padding: int = 4,
            flip: bool = True,
            mixup_alpha: Optional[float] = None,
            fill: float = 0.0) -> chex.Array:
  """Random crop, then horizontal flip, then (optionally) mixup.

  The three steps use independent keys ``jax.random.split(rng, 3)``.

  Args:
    rng: PRNG key (one per training step).
    images: ``[B, H, W, C]``.
    crop_padding: :func:`random_crop` padding (``0``: no crop).
    flip: apply :func:`random_flip` with probability 0.5.
    mixup_alpha: if given, apply :func:`mixup` with this ``alpha``.
    fill: padding value of the crop.

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  k_crop, k_flip, k_mix = jax.random.split(rng, 3)
  images = random_crop(k_crop, images, crop_padding, fill)
  if flip:
    images = random_flip(k_flip, images)
  if mixup_alpha is not None:
    images = mixup(k_mix, images, mixup_alpha)
  return images


def augment_batch(rng: chex.PRNGKey,
                  batch: Mapping[str, Any],
                  *,
                  image_key: str = "image",
                  **kwargs: Any) -> dict[str, Any]:
  """``batch`` with ``batch[image_key]`` replaced by :func:`augment` of it.

  The single augmented batch is then given to both teacher and student
  (consistent teaching). Other entries (``"label"``, ``"index"``, ``"mask"``)
  are passed through unchanged.
  """
  if image_key not in batch:
    raise KeyError(f"batch has no {image_key!r} entry; it has "
                   f"{sorted(batch)}.")
  out = dict(batch)
  out[image_key] = augment(rng, batch[image_key], **kwargs)
  return out


__all__ = ["augment", "augment_batch", "mixup", "mixup_weight", "random_crop",
           "random_flip"]
