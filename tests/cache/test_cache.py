"""Tests of the offline teacher cache: format, exactness, fingerprints, errors."""

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

N, B, F, H, C = 48, 16, 6, 7, 5
T = 2.0


def teacher_fn(params, x):
  h = jnp.tanh(x @ params["w1"])
  return h @ params["w2"] + params["b"], {"hidden": h}


def student_fn(params, x):
  return x @ params["w"] + params["b"]


def teacher_vars(seed=2):
  rng = np.random.default_rng(seed)
  return {"params": {"w1": rng.normal(size=(F, H)).astype(np.float32),
                     "w2": (2 * rng.normal(size=(H, C))).astype(np.float32),
                     "b": rng.normal(size=(C,)).astype(np.float32)}}


def student_vars():
  rng = np.random.default_rng(1)
  return {"params": {"w": rng.normal(size=(F, C)).astype(np.float32),
                     "b": np.zeros((C,), np.float32)}}


def dataset(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(N, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(N,)).astype(np.int32)}


TEACHER = models.from_function(teacher_fn, feature_names=("hidden",))
STUDENT = models.from_function(student_fn)


def np_teacher(tv, x):
  p = tv["params"]
  h = np.tanh(x.astype(np.float64) @ p["w1"])
  return h @ p["w2"] + p["b"], h


def kd_loss(term=None):
  term = term or losses.logit_term(losses.kl_divergence)
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.2, needs_teacher=False),
       losses.Term("kd", term, 0.8)], temperature=T)


def fresh_state(opt):
  return train.create_state(jax.tree.map(jnp.asarray, student_vars()), opt,
                            rng=jax.random.key(0))


def run_online(loss_fn, data, steps_batches):
  opt = optax.adam(1e-2)
  state = fresh_state(opt)
  step = train.make_train_step(STUDENT, TEACHER, loss_fn, opt)
  out = []
  for b in steps_batches:
    state, m = step(state, teacher_vars(), b)
    out.append(float(m["loss"]))
  return state, np.array(out)


def run_cached(loss_fn, tc):
  opt = optax.adam(1e-2)
  state = fresh_state(opt)
  step = cache.make_cached_train_step(STUDENT, tc, loss_fn, opt)
  out = []
  for b in tc.batches(B):
    state, m = step(state, None, b)
    out.append(float(m["loss"]))
  return state, np.array(out)


def in_order(data):
  return [{k: v[s:s + B] for k, v in data.items()} for s in range(0, N, B)]


@pytest.fixture()
def full_cache(tmp_path):
  return cache.build_teacher_cache(
      str(tmp_path / "full"), TEACHER, teacher_vars(), dataset(), k=None,
      feature_names=("hidden",), batch_size=B, examples_per_shard=20)


def test_format_manifest_and_shards(full_cache):
  with open(os.path.join(full_cache.path, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["format"] == "kdjax.teacher_cache"
  assert manifest["version"] == 1
  assert manifest["num_examples"] == N and manifest["num_classes"] == C
  assert manifest["mode"] == "full" and manifest["k"] is None
  assert manifest["feature_names"] == ["hidden"]
  assert set(manifest["fingerprint"]) == {"teacher", "dataset", "k",
                                          "temperature", "combined"}
  shards = manifest["shards"]
  assert [s["num_examples"] for s in shards] == [32, 16]  # flushed at >= 20
  assert [s["start"] for s in shards] == [0, 32]
  with np.load(os.path.join(full_cache.path, shards[1]["file"])) as z:
    assert sorted(z.files) == ["example/image", "example/label",
                               "teacher/features/hidden", "teacher/logits"]
    # Independent reference: the teacher in float64 NumPy.
    logits, hidden = np_teacher(teacher_vars(), dataset()["image"][32:])
    np.testing.assert_allclose(z["teacher/logits"], logits, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(z["teacher/features/hidden"], hidden,
                               atol=1e-6)
    np.testing.assert_array_equal(z["example/label"], dataset()["label"][32:])


def test_top_k_entries_match_numpy(tmp_path):
  k = 3
  tc = cache.build_teacher_cache(str(tmp_path / "topk"), TEACHER,
                                 teacher_vars(), dataset(), k=k,
                                 temperature=T, batch_size=B)
  arrays = tc.load()
  logits, _ = np_teacher(teacher_vars(), dataset()["image"])
  order = np.argsort(-logits, axis=-1)[:, :k]
  np.testing.assert_array_equal(arrays["teacher/indices"], order)
  np.testing.assert_allclose(arrays["teacher/values"],
                             np.take_along_axis(logits, order, -1), rtol=1e-5,
                             atol=1e-5)
  z = logits / T
  lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
  np.testing.assert_allclose(arrays["teacher/logsumexp"], lse, rtol=1e-5)
  assert arrays["teacher/indices"].dtype == np.int32


@pytest.mark.parametrize("k", [None, C])
def test_cached_run_reproduces_online_losses(tmp_path, k):
  data = dataset()
  tc = cache.build_teacher_cache(str(tmp_path / f"c{k}"), TEACHER,
                                 teacher_vars(), data, k=k, temperature=T,
                                 batch_size=B)
  online_state, online = run_online(kd_loss(), data, in_order(data))
  cached_state, cached = run_cached(kd_loss(), tc)
  assert len(cached) == N // B
  np.testing.assert_allclose(cached, online, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(cached_state.params),
                  jax.tree.leaves(online_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_top_k_term_cached_equals_online(tmp_path):
  k = 2
  data = dataset()
  tc = cache.build_teacher_cache(str(tmp_path / "k2"), TEACHER, teacher_vars(),
                                 data, k=k, temperature=T, batch_size=B)
  _, online = run_online(kd_loss(cache.top_k_term(k=k)), data, in_order(data))
  _, cached = run_cached(kd_loss(cache.top_k_term()), tc)
  np.testing.assert_allclose(cached, online, rtol=1e-6)
  # k < C loses information: the losses differ from the full-logit run.
  _, full = run_online(kd_loss(), data, in_order(data))
  assert np.max(np.abs(full - online)) > 1e-4
  # Full logits cannot be rebuilt from a k < C cache: a clear error.
  with pytest.raises(ValueError, match="top k=2 of 5 logits"):
    run_cached(kd_loss(), tc)


def test_fingerprint_mismatch_errors(full_cache):
  path = full_cache.path
  cache.open_teacher_cache(path, teacher_variables=teacher_vars(),
                           dataset=dataset(), k=None)  # matches: no error
  with pytest.raises(cache.CacheMismatchError, match="another teacher"):
    cache.open_teacher_cache(path, teacher_variables=teacher_vars(seed=9))
  other = dataset()
  other["label"] = (other["label"] + 1) % C
  with pytest.raises(cache.CacheMismatchError, match="another dataset"):
    cache.open_teacher_cache(path, dataset=other)
  with pytest.raises(cache.CacheMismatchError, match=r"k=None.*3 was asked"):
    cache.open_teacher_cache(path, k=3)
  assert issubclass(cache.CacheMismatchError, ValueError)
  # A dataset named instead of hashed.
  named = cache.build_teacher_cache(path + "-named", TEACHER, teacher_vars(),
                                    dataset(), dataset_fingerprint="toy:1/train")
  cache.open_teacher_cache(named.path, dataset_fingerprint="toy:1/train")
  with pytest.raises(cache.CacheMismatchError, match="toy:2/train"):
    cache.open_teacher_cache(named.path, dataset_fingerprint="toy:2/train")


def test_fingerprints_are_content_hashes():
  a = cache.fingerprint_tree(teacher_vars())
  assert a == cache.fingerprint_tree(teacher_vars())
  assert a.startswith("sha256:") and len(a) == 7 + 64
  changed = teacher_vars()
  changed["params"]["b"][0] += 1e-6
  assert cache.fingerprint_tree(changed) != a
  data = dataset()
  assert cache.fingerprint_dataset(data) != cache.fingerprint_dataset(
      {k: v[::-1] for k, v in data.items()})


def test_iterable_dataset_and_padding(tmp_path):
  data = dataset()
  batches = [{k: v[s:s + 20] for k, v in data.items()} for s in range(0, N, 20)]
  tc = cache.build_teacher_cache(str(tmp_path / "it"), TEACHER, teacher_vars(),
                                 iter(batches), batch_size=20)
  assert tc.num_examples == N  # 20 + 20 + 8 (the last one padded, then cut)
  assert tc.fingerprint["dataset"] == cache.fingerprint_dataset(batches)
  logits, _ = np_teacher(teacher_vars(), data["image"])
  np.testing.assert_allclose(tc.load()["teacher/logits"], logits, rtol=1e-5,
                             atol=1e-5)


def test_temperature_mismatch_and_build_errors(tmp_path):
  tc = cache.build_teacher_cache(str(tmp_path / "t"), TEACHER, teacher_vars(),
                                 dataset(), k=2, temperature=1.0)
  with pytest.raises(ValueError, match="temperature 2.0.*temperature 1.0"):
    cache.make_cached_train_step(STUDENT, tc, kd_loss(cache.top_k_term()),
                                 optax.sgd(0.1))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    cache.build_teacher_cache(str(tmp_path / "t"), TEACHER, teacher_vars(),
                              dataset())
  with pytest.raises(ValueError, match="k=9 exceeds"):
    cache.build_teacher_cache(str(tmp_path / "k9"), TEACHER, teacher_vars(),
                              dataset(), k=9)
  with pytest.raises(FileNotFoundError, match="no teacher cache"):
    cache.open_teacher_cache(str(tmp_path / "missing"))
  with pytest.raises(KeyError, match="hidden"):
    cache.build_teacher_cache(str(tmp_path / "f"),
                              models.from_function(student_fn), student_vars(),
                              dataset(), feature_names=("hidden",))


def test_nan_teacher_is_named_at_build(tmp_path):
  data = dataset()
  data["image"][21, 3] = np.nan  # only example 21's output is NaN
  with pytest.raises(FloatingPointError,
                     match=r"'big-teacher'.*NaN/inf in 'logits' for examples "
                           r"\[21\]"):
    cache.build_teacher_cache(str(tmp_path / "nan"), TEACHER, teacher_vars(),
                              data, batch_size=B, teacher_name="big-teacher")


def test_batches_shuffle_and_process_split(full_cache):
  seen = np.concatenate([b["label"] for b in full_cache.batches(B)])
  np.testing.assert_array_equal(seen, dataset()["label"])
  shuffled = list(full_cache.batches(B, shuffle=True, seed=3))
  images = np.concatenate([b["image"] for b in shuffled])
  assert not np.array_equal(images, dataset()["image"])
  np.testing.assert_array_equal(np.sort(images, axis=0),
                                np.sort(dataset()["image"], axis=0))
  first = shuffled[0]
  assert set(first) == {"image", "label", "teacher"}
  assert set(first["teacher"]) == {"logits", "features"}
  halves = [next(full_cache.batches(B, shuffle=True, seed=3, process_index=i,
                                    process_count=2)) for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h["image"] for h in halves]), first["image"])
  cached = full_cache.teacher_apply()(None, first)
  np.testing.assert_array_equal(cached.feature("hidden"),
                                first["teacher"]["features"]["hidden"])
  with pytest.raises(KeyError, match="no feature named 'conv'"):
    cached.feature("conv")
  with pytest.raises(KeyError, match="no 'teacher' entry"):
    full_cache.teacher_apply()(None, {"image": first["image"]})


def test_cached_eval_and_check_finite(full_cache):
  batch = next(full_cache.batches(B))
  eval_step = train.make_eval_step(STUDENT, full_cache.teacher_apply(),
                                   temperature=T)
  sums = eval_step(student_vars(), None, batch)
  logits, _ = np_teacher(teacher_vars(), batch["image"])
  np.testing.assert_allclose(
      sums["teacher_correct"],
      np.sum(logits.argmax(-1) == batch["label"]))
  # The NaN check also covers cached outputs.
  batch["teacher"]["logits"] = batch["teacher"]["logits"].copy()
  batch["teacher"]["logits"][3, 1] = np.inf
  opt = optax.sgd(0.1)
  step = cache.make_cached_train_step(STUDENT, full_cache, kd_loss(), opt,
                                      check_teacher_finite=True,
                                      teacher_name="cached-t")
  with pytest.raises(FloatingPointError, match="cached-t"):
    step(fresh_state(opt), None, batch)
