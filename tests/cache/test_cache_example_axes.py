"""Teacher caches of arrays whose examples are not on axis 0 (ensembles, time-major)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import cache
from kdjax import losses
from kdjax import models
from kdjax import train

N, F, C = 10, 6, 4
T = 2.0
MLP = models.MLP(hidden=(5,), num_classes=C)
MLP_APPLY = models.from_linen(MLP, train_kwarg="train")


def ensemble(m):
  """``ensemble_apply`` of ``m`` tiny MLP teachers and their variables."""
  x = np.zeros((2, F), np.float32)
  variables = tuple(MLP.init(jax.random.key(10 + i), x) for i in range(m))
  return models.ensemble_apply([MLP_APPLY] * m), variables


def dataset():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(N, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(N,)).astype(np.int32)}


def np_mlp(variables, x):
  """Independent float64 NumPy reference of ``MLP(hidden=(5,))``."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  h = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0.0)
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def np_stacked(variables, x):
  return np.stack([np_mlp(v, x.astype(np.float64)) for v in variables])


def in_order(data, b):
  return [{k: v[s:s + b] for k, v in data.items()} for s in range(0, N, b)]


def online_stacked(apply, variables, batch, padded_size):
  """The online teacher's ``[M, b, C]`` on the batch padded as the cache pads it."""
  n = len(batch["label"])
  pad = {k: np.concatenate([v, np.repeat(v[-1:], padded_size - n, axis=0)])
         for k, v in batch.items()}
  out = jax.jit(lambda v, b: apply(v, b).features["teacher_logits"])(
      variables, pad)
  return np.asarray(out)[:, :n]


@pytest.mark.parametrize("m, b, k", [(3, 4, None), (3, 4, 2), (3, 3, None)])
def test_stacked_logits_read_back_in_teacher_layout(tmp_path, m, b, k):
  # (3, 4): 4 does not divide N = 10 (the last batch is padded); (3, 3): M == B.
  apply, tv = ensemble(m)
  data = dataset()
  tc = cache.build_teacher_cache(
      str(tmp_path / "c"), apply, tv, data, k=k, temperature=T,
      feature_names=("teacher_logits",), batch_size=b, examples_per_shard=5)
  manifest = json.load(open(os.path.join(tc.path, "manifest.json")))
  assert manifest["version"] == 2
  assert manifest["example_axes"]["teacher/features/teacher_logits"] == 1
  assert sum(manifest["example_axes"].values()) == 1  # every other array: 0
  # Stored example-major: a shard is a contiguous run of examples [n, M, C].
  first = manifest["shards"][0]
  with np.load(os.path.join(tc.path, first["file"])) as z:
    stored = z["teacher/features/teacher_logits"]
  assert stored.shape == (first["num_examples"], m, C)
  ref = np_stacked(tv, data["image"])  # [M, N, C]
  np.testing.assert_allclose(stored, ref[:, :first["num_examples"]]
                             .transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
  # load(): the teacher's layout; example_major=True: as stored.
  assert tc.load()["teacher/features/teacher_logits"].shape == (m, N, C)
  np.testing.assert_allclose(tc.load()["teacher/features/teacher_logits"],
                             ref, rtol=1e-5, atol=1e-5)
  assert tc.load(example_major=True)[
      "teacher/features/teacher_logits"].shape == (N, m, C)
  # Every batch, the partial last one included, equals the online [M, B, C].
  got = list(tc.batches(b, drop_remainder=False))
  assert [len(g["label"]) for g in got] == [len(o["label"])
                                            for o in in_order(data, b)]
  for start, g, o in zip(range(0, N, b), got, in_order(data, b)):
    np.testing.assert_array_equal(g["image"], o["image"])
    online = online_stacked(apply, tv, o, b)
    assert g["teacher"]["features"]["teacher_logits"].shape == online.shape
    np.testing.assert_array_equal(g["teacher"]["features"]["teacher_logits"],
                                  online)
    out = tc.teacher_apply()(None, g)
    np.testing.assert_array_equal(out.feature("teacher_logits"), online)
    if k is not None:  # the ensemble's own [B, C] logits: top-k on axis 0
      z = np.log(np.mean(np.exp(ref - ref.max(-1, keepdims=True))
                         / np.exp(ref - ref.max(-1, keepdims=True)).sum(
                             -1, keepdims=True), axis=0))
      rows = np.arange(start, start + len(o["label"]))
      order = np.argsort(-z[rows], axis=-1)[:, :k]
      np.testing.assert_array_equal(g["teacher"]["indices"], order)
      assert g["teacher"]["values"].shape == (len(rows), k)
      assert g["teacher"]["logsumexp"].shape == (len(rows),)
  # Shuffled: column i of the stack belongs to example i of the batch.
  for g in tc.batches(b, shuffle=True, seed=1):
    np.testing.assert_allclose(g["teacher"]["features"]["teacher_logits"],
                               np_stacked(tv, g["image"]), rtol=1e-5,
                               atol=1e-5)


def multi_loss():
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.3, needs_teacher=False),
       losses.multi_teacher_term(weight=0.7)], temperature=T)


def student_fn(params, x):
  return x @ params["w"] + params["b"]


STUDENT = models.from_function(student_fn)


def fresh_state(opt):
  rng = np.random.default_rng(1)
  sv = {"params": {"w": jnp.asarray(rng.normal(size=(F, C)), jnp.float32),
                   "b": jnp.zeros((C,), jnp.float32)}}
  return train.create_state(sv, opt, rng=jax.random.key(0))


@pytest.mark.parametrize("k", [None, 2])
def test_multi_teacher_step_from_cache_equals_online(tmp_path, k):
  m, b = 3, 4
  apply, tv = ensemble(m)
  data = dataset()
  tc = cache.build_teacher_cache(
      str(tmp_path / "c"), apply, tv, data, k=k, temperature=T,
      feature_names=("teacher_logits",), batch_size=b)
  opt = optax.adam(1e-2)
  online_step = train.make_train_step(STUDENT, apply, multi_loss(), opt)
  cached_step = cache.make_cached_train_step(STUDENT, tc, multi_loss(), opt)
  s_on, s_off = fresh_state(opt), fresh_state(opt)
  cached = list(tc.batches(b))  # drop_remainder: 2 batches of 4
  assert len(cached) == N // b
  for o, c in zip(in_order(data, b), cached):
    s_on, m_on = online_step(s_on, tv, o)
    s_off, m_off = cached_step(s_off, None, c)
    np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]),
                               rtol=1e-6)
    assert np.isfinite(float(m_on["loss"])) and float(m_on["loss"]) > 0
  for x, y in zip(jax.tree.leaves(s_off.params), jax.tree.leaves(s_on.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # Independent NumPy reference of the first step's loss (at the initial
  # parameters): 0.3 CE + 0.7 T^2 KL(mean_i softmax(z_i / T) || softmax(s / T)).
  x, y = data["image"][:b].astype(np.float64), data["label"][:b]
  p0 = jax.tree.map(lambda a: np.asarray(a, np.float64),
                    fresh_state(opt).params)
  s = x @ p0["w"] + p0["b"]
  log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(  # noqa: E731
      np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  pbar = np.exp(log_softmax(np_stacked(tv, x) / T)).mean(0)
  kd = T**2 * np.mean(np.sum(pbar * (np.log(pbar) - log_softmax(s / T)), -1))
  ce = -np.mean(log_softmax(s)[np.arange(b), y])
  s_ref = fresh_state(opt)
  _, m_first = cached_step(s_ref, None, cached[0])
  np.testing.assert_allclose(float(m_first["loss"]), 0.3 * ce + 0.7 * kd,
                             rtol=1e-5)


def time_major_teacher(params, x):
  """Logits ``[B, C]`` and a time-major feature ``seq`` ``[S, B, H]``."""
  h = jnp.tanh(x @ params["w"])                      # [B, H]
  seq = jnp.stack([h, 2.0 * h, h * h])               # [3, B, H]
  seq = seq + 0.0 * jnp.log(x[:, :1].T)[..., None]  # NaN where x[:, 0] < 0
  return h @ params["v"], {"seq": seq}


TIME_MAJOR = models.from_function(time_major_teacher, feature_names=("seq",))


def time_major_vars():
  rng = np.random.default_rng(3)
  return {"params": {"w": rng.normal(size=(F, 5)).astype(np.float32),
                     "v": rng.normal(size=(5, C)).astype(np.float32)}}


def test_named_negative_axis_and_nan_check_use_the_example_axis(tmp_path):
  data = dataset()
  data["image"][:, 0] = np.abs(data["image"][:, 0]) + 0.5  # log finite
  tv = time_major_vars()
  tc = cache.build_teacher_cache(
      str(tmp_path / "seq"), TIME_MAJOR, tv, data, feature_names=("seq",),
      example_axes={"seq": -2}, batch_size=4)
  assert tc.example_axes["teacher/features/seq"] == 1
  h = np.tanh(data["image"].astype(np.float64) @ tv["params"]["w"])
  ref = np.stack([h, 2 * h, h * h])  # [3, N, H]
  seq = tc.load()["teacher/features/seq"]
  assert seq.shape == (3, N, 5)
  np.testing.assert_allclose(seq, ref, rtol=1e-5, atol=1e-6)
  batch = next(tc.batches(4, shuffle=True, seed=2))
  hb = np.tanh(batch["image"].astype(np.float64) @ tv["params"]["w"])
  np.testing.assert_allclose(batch["teacher"]["features"]["seq"],
                             np.stack([hb, 2 * hb, hb * hb]), rtol=1e-5,
                             atol=1e-6)
  # The NaN check reports examples along the example axis: only example 6's
  # feature column is NaN (its logits are finite).
  bad = dict(data)
  bad["image"] = data["image"].copy()
  bad["image"][6, 0] = -1.0
  with pytest.raises(FloatingPointError,
                     match=r"NaN/inf in 'features/seq' for examples \[6\]"):
    cache.build_teacher_cache(
        str(tmp_path / "nan"), TIME_MAJOR, tv, bad, feature_names=("seq",),
        example_axes={"seq": 1}, batch_size=4)


def test_bad_example_axes_are_named(tmp_path):
  apply, tv = ensemble(2)
  data = dataset()
  build = lambda name, **kw: cache.build_teacher_cache(  # noqa: E731
      str(tmp_path / name), apply, tv, data, batch_size=4,
      feature_names=("teacher_logits",), **kw)
  with pytest.raises(ValueError, match=r"example_axes\['teacher_logits'\] = 3 "
                                       r"is out of range for the feature "
                                       r"'teacher_logits' of shape \(2, 4, 4\)"):
    build("a", example_axes={"teacher_logits": 3})
  with pytest.raises(ValueError, match=r"'teacher_logits'.*out of range"):
    build("b", example_axes={"teacher_logits": -4})
  with pytest.raises(ValueError, match=r"example_axes\['logits'\] = -1 .*"
                                       r"holds the classes"):
    build("c", example_axes={"logits": -1})
  with pytest.raises(ValueError, match=r"names 'hidden', which the cache does "
                                       r"not store"):
    build("d", example_axes={"hidden": 0})
  with pytest.raises(ValueError, match=r"must be an int"):
    build("e", example_axes={"teacher_logits": 1.0})
  # Axis 0 of the [M=2, B=4, C] stack does not hold the batch's 4 examples.
  with pytest.raises(ValueError, match=r"'features/teacher_logits' has shape "
                                       r"\(2, 4, 4\): its example axis 0 does "
                                       r"not hold the batch's 4 examples"):
    build("f", example_axes={"teacher_logits": 0})


def test_old_manifest_without_axes_opens_with_axis_zero(tmp_path):
  apply, tv = ensemble(2)
  data = dataset()
  # A cache of a plain teacher (every axis 0) is written as version 1.
  single = models.from_linen(MLP, train_kwarg="train", feature_names=(
      "penultimate",))
  tc = cache.build_teacher_cache(str(tmp_path / "plain"), single, tv[0], data,
                                 feature_names=("penultimate",), batch_size=4)
  path = os.path.join(tc.path, "manifest.json")
  manifest = json.load(open(path))
  assert manifest["version"] == 1
  assert set(manifest["example_axes"].values()) == {0}
  new_batches = list(tc.batches(4))
  # The format before example_axes existed: no such key.
  del manifest["example_axes"]
  json.dump(manifest, open(path, "w"))
  old = cache.open_teacher_cache(tc.path, teacher_variables=tv[0],
                                 dataset=data, k=None)
  assert old.example_axes == {}
  np.testing.assert_allclose(old.load()["teacher/logits"],
                             np_mlp(tv[0], data["image"].astype(np.float64)),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(old.batches(4), new_batches):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  # An ensemble cache minus its example_axes reads example-major (axis 0).
  ens = cache.build_teacher_cache(str(tmp_path / "ens"), apply, tv, data,
                                  feature_names=("teacher_logits",),
                                  batch_size=4)
  ens_path = os.path.join(ens.path, "manifest.json")
  manifest = json.load(open(ens_path))
  del manifest["example_axes"]
  json.dump(manifest, open(ens_path, "w"))
  assert cache.open_teacher_cache(ens.path).load()[
      "teacher/features/teacher_logits"].shape == (N, 2, C)
  # Unknown versions and malformed axes are refused.
  manifest["version"] = 3
  json.dump(manifest, open(ens_path, "w"))
  with pytest.raises(ValueError, match="version 3 is not supported"):
    cache.open_teacher_cache(ens.path)
  manifest["version"] = 2
  manifest["example_axes"] = {"teacher/logits": -1}
  json.dump(manifest, open(ens_path, "w"))
  with pytest.raises(ValueError, match="'example_axes' must map"):
    cache.open_teacher_cache(ens.path)
