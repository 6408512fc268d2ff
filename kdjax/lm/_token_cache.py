"""A token cache: tokenized ``(prompt, completion)`` examples on disk,
memory-mapped, for LM data larger than memory.

:func:`write_token_cache` streams the examples to a directory once;
:func:`open_token_cache` memory-maps it as a :class:`TokenCache`, a sequence
whose item ``i`` is example ``i``; :class:`kdjax.lm.LMBatches` takes it in
place of the two in-memory lists (``LMBatches.from_examples(cache, ...)``)
and reads only the examples of each batch (packing reads the lengths alone,
:meth:`TokenCache.lengths`).

On-disk format (version 1)::

  <directory>/manifest.json         written last (see below)
  <directory>/shard-00000/tokens.npy       int32 [T_s]: every example's
                                           prompt ids then completion ids,
                                           example after example
  <directory>/shard-00000/offsets.npy      int64 [n_s + 1]: example j is
                                           tokens[offsets[j]:offsets[j+1]],
                                           offsets[0] = 0, offsets[-1] = T_s
  <directory>/shard-00000/prompt_lens.npy  int32 [n_s]: its first
                                           prompt_lens[j] ids are the prompt
  <directory>/shard-00001/...

Example ``i`` (global) is example ``i - first`` of the shard holding it,
shards in order, each of ``shard_examples`` examples (the last fewer).
``manifest.json`` holds ``{"format": "kdjax.lm.token_cache", "version": 1,
"fingerprint": str, "fingerprint_parts": dict or null, "num_examples": n,
"num_tokens": T, "dtype": "int32", "shards": [{"name", "num_examples",
"num_tokens"}], "metadata": dict}``. The ``fingerprint`` is the caller's
name of what the examples were made from (the tokenizer, the data files,
``seq_len``...): a string, or ``"sha256:<hex>"`` of a JSON-able mapping of
parts (:func:`token_cache_fingerprint`, the parts kept to name what
differs). A token id must be in ``[0, 2**31)``.

Atomic: the cache is written into a temporary sibling directory
(``.<name>.tmp-<random>``, every file fsynced, the manifest last) renamed to
``<directory>`` at the end, so a write that fails or is killed never leaves
a directory that looks complete (a killed one leaves its temporary
directory, safe to delete; an exception removes it). Re-running with the
same fingerprint reuses the cache without reading the examples (pass a
generator: nothing is tokenized); another fingerprint is refused
(:class:`TokenCacheMismatchError`, naming the directory) or, with
``on_mismatch="rebuild"``, the cache is rebuilt and replaces the old one. A
directory that is not a token cache is never overwritten.

Why ``.npy`` shards (not ArrayRecord / grain / TFRecord): the examples are
read at random (a shuffle per epoch, :class:`kdjax.lm.LMBatches`), which a
memory map of flat arrays does in O(1) with no decoding and no dependency
beyond NumPy (the GPU image has no grain or tfds); the page cache holds what
fits; the files are readable by any NumPy. ``tokens.npy`` is written as a
stream (its 128-byte ``.npy`` header rewritten with the final length), so
the writer holds one shard's offsets and a 1 Mi-id buffer, never the tokens.
Each open shard holds three memory maps (three file descriptors): keep
``shard_examples`` large (default 2**20).

Several processes (a shared file system): write the cache from process 0,
wait for it (a barrier), then open it in each (:func:`open_token_cache`
with the fingerprint); :class:`kdjax.lm.LMBatches` gives each process its
rows of every global batch (``process_index``/``process_count``). Writers
racing to create a new cache of one fingerprint are safe (the first rename
wins, the others reuse it); racing ``on_mismatch="rebuild"`` writers are
not.
"""

from __future__ import annotations

import array
import bisect
import collections.abc
import hashlib
import json
import os
import shutil
import struct
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

FORMAT = "kdjax.lm.token_cache"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS, OFFSETS, PROMPT_LENS = "tokens.npy", "offsets.npy", "prompt_lens.npy"
ON_MISMATCH = ("error", "rebuild")

_HEADER_BYTES = 128  # the fixed .npy (version 1.0) header of tokens.npy
_FLUSH_IDS = 1 << 20  # ids buffered before they are written
_MAX_ID = 2**31 - 1

Ids = Union[Sequence[int], np.ndarray]


class TokenCacheError(ValueError):
  """A directory that is not a complete token cache of this format."""


class TokenCacheMismatchError(TokenCacheError):
  """A token cache made from other inputs (another fingerprint)."""


def token_cache_fingerprint(parts: Mapping[str, Any]) -> str:
  """``"sha256:<hex>"`` of ``parts`` as canonical JSON (sorted keys).

  E.g. ``{"tokenizer": tokenizer.fingerprint, "data": <a digest of the
  files>, "seq_len": 512, "last_turn_only": False}``: every input that
  changes the examples.

  Raises:
    TypeError: ``parts`` is not JSON-able.
  """
  text = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Column(collections.abc.Sequence):
  """The prompts (``part=0``) or completions (``part=1``) of a cache."""

  def __init__(self, cache: "TokenCache", part: int):
    self._cache, self._part = cache, part

  def __len__(self) -> int:
    return len(self._cache)

  def __getitem__(self, i):  # type: ignore[override]
    return self._cache._read(i, self._part)  # pylint: disable=protected-access


class TokenCache(collections.abc.Sequence):
  """A token cache on disk, memory-mapped (format: the module docstring).

  A sequence of examples: ``cache[i] == cache.example(i) == (prompt,
  completion)``, int32 NumPy arrays (copies of the mapped ids). Nothing is
  read until an example is asked for. Open it with
  :func:`open_token_cache`.

  Attributes:
    path: the cache's directory.
    manifest: its ``manifest.json``.
    fingerprint: what the examples were made from (the writer's).
    fingerprint_parts: the parts it hashes, or None (a string fingerprint).
    metadata: the writer's metadata.
    num_tokens: the ids of every example.
    prompts, completions: sequences of the prompts and of the completions
      (``cache.prompts[i] == cache[i][0]``), each reading only its part.
  """

  def __init__(self, path: str, manifest: Mapping[str, Any]):
    self.path = path
    self.manifest = dict(manifest)
    self.fingerprint: str = self.manifest["fingerprint"]
    self.fingerprint_parts: Optional[dict] = self.manifest.get(
        "fingerprint_parts")
    self.metadata: dict = dict(self.manifest.get("metadata") or {})
    self.num_tokens: int = int(self.manifest["num_tokens"])
    self._n = int(self.manifest["num_examples"])
    self._tokens, self._offsets, self._prompt_lens = [], [], []
    self._starts = []  # the first example of each shard
    first = 0
    for shard in self.manifest["shards"]:
      base = os.path.join(path, shard["name"])
      n, t = int(shard["num_examples"]), int(shard["num_tokens"])
      arrays = [_load(os.path.join(base, name), dtype, size)
                for name, dtype, size in ((TOKENS, np.int32, t),
                                          (OFFSETS, np.int64, n + 1),
                                          (PROMPT_LENS, np.int32, n))]
      if arrays[1][0] != 0 or arrays[1][-1] != t:
        raise TokenCacheError(f"{base}: offsets do not span the {t} tokens "
                              "(a damaged cache; delete it and rebuild).")
      for store, array_ in zip((self._tokens, self._offsets,
                                self._prompt_lens), arrays):
        store.append(array_)
      self._starts.append(first)
      first += n
    if first != self._n:
      raise TokenCacheError(f"{path}: the shards hold {first} examples, the "
                            f"manifest {self._n} (a damaged cache).")
    self.prompts: Sequence[np.ndarray] = _Column(self, 0)
    self.completions: Sequence[np.ndarray] = _Column(self, 1)

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:
    return (f"TokenCache({self.path!r}, {self._n} examples, "
            f"{self.num_tokens} tokens, {len(self._starts)} shards)")

  def _locate(self, i: int) -> tuple[int, int]:
    i = int(i)
    if i < 0:
      i += self._n
    if not 0 <= i < self._n:
      raise IndexError(f"example {i} of a token cache of {self._n}.")
    s = bisect.bisect_right(self._starts, i) - 1
    return s, i - self._starts[s]

  def _read(self, i: int, part: Optional[int]):
    s, j = self._locate(i)
    offsets = self._offsets[s]
    start, stop = int(offsets[j]), int(offsets[j + 1])
    mid = start + int(self._prompt_lens[s][j])
    tokens = self._tokens[s]
    if part == 0:
      return np.array(tokens[start:mid])
    if part == 1:
      return np.array(tokens[mid:stop])
    return np.array(tokens[start:mid]), np.array(tokens[mid:stop])

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt, completion)`` of example ``i``: int32 arrays."""
    return self._read(i, None)

  def __getitem__(self, i):  # type: ignore[override]
    return self._read(i, None)

  def lengths(self) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_lens, completion_lens)``: int64 ``[n]`` each, from the
    offsets (no token is read; e.g. for :func:`kdjax.lm.pack_lengths`)."""
    if not self._n:
      return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    prompt = np.concatenate([np.asarray(p, np.int64)
                             for p in self._prompt_lens])
    total = np.concatenate([np.diff(o) for o in self._offsets])
    return prompt, total - prompt


def _load(path: str, dtype, size: int) -> np.ndarray:
  try:
    a = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise TokenCacheError(f"{path}: cannot read it ({e}); a damaged cache: "
                          "delete it and rebuild.") from None
  if a.dtype != dtype or a.shape != (size,):
    raise TokenCacheError(f"{path}: {a.dtype} {a.shape}, expected "
                          f"{np.dtype(dtype)} ({size},) (a damaged cache).")
  return a


def _read_manifest(directory: str) -> Optional[dict]:
  """The manifest of ``directory``, or None if it has none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise TokenCacheError(f"{path}: unreadable ({e}).") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise TokenCacheError(f"{directory}: {MANIFEST} is not a kdjax token "
                          "cache's.")
  return manifest


def _mismatch(directory: str, manifest: Mapping[str, Any], fingerprint: str,
              parts: Optional[Mapping[str, Any]]) -> Optional[str]:
  """None if the cache is of ``fingerprint`` (and this version), else why
  not, in words."""
  if manifest.get("version") != VERSION:
    return (f"the token cache in {directory} has format version "
            f"{manifest.get('version')!r}, this kdjax reads {VERSION}")
  if manifest.get("fingerprint") == fingerprint:
    return None
  why = (f"the token cache in {directory} was made from other inputs "
         f"(fingerprint {manifest.get('fingerprint')}, asked for "
         f"{fingerprint})")
  had = manifest.get("fingerprint_parts")
  if isinstance(had, dict) and parts is not None:
    differ = sorted(k for k in set(had) | set(parts)
                    if had.get(k, "<absent>") != parts.get(k, "<absent>"))
    why += "; differing: " + ", ".join(
        f"{k} ({had.get(k, '<absent>')!r} -> {parts.get(k, '<absent>')!r})"
        for k in differ)
  return why


def _fingerprint_of(fingerprint: Union[str, Mapping[str, Any]]
                    ) -> tuple[str, Optional[dict]]:
  if isinstance(fingerprint, str):
    if not fingerprint:
      raise ValueError("the fingerprint is empty; name what the examples "
                       "were made from.")
    return fingerprint, None
  parts = json.loads(json.dumps(dict(fingerprint)))  # JSON-able, a copy
  return token_cache_fingerprint(parts), parts


def open_token_cache(directory: Union[str, os.PathLike], *,
                     fingerprint: Union[str, Mapping[str, Any], None] = None
                     ) -> TokenCache:
  """Memory-maps the token cache in ``directory``.

  Args:
    directory: a directory of :func:`write_token_cache`.
    fingerprint: if given, the cache must have been made from it.

  Returns:
    The :class:`TokenCache` (nothing but the small manifest read).

  Raises:
    TokenCacheError: no complete token cache there (no manifest: never
      written, or a write that did not finish), another format version, or
      damaged files.
    TokenCacheMismatchError: another fingerprint.
  """
  directory = os.fspath(directory)
  manifest = _read_manifest(directory)
  if manifest is None:
    raise TokenCacheError(f"{directory}: no token cache there (no "
                          f"{MANIFEST}); write it with write_token_cache.")
  if manifest.get("version") != VERSION:
    raise TokenCacheError(f"{directory}: a token cache of format version "
                          f"{manifest.get('version')!r}; this kdjax reads "
                          f"{VERSION}: rebuild it.")
  if fingerprint is not None:
    fp, parts = _fingerprint_of(fingerprint)
    why = _mismatch(directory, manifest, fp, parts)
    if why:
      raise TokenCacheMismatchError(why + ".")
  return TokenCache(directory, manifest)


def _npy_header(n: int) -> bytes:
  """A ``.npy`` 1.0 header of an int32 ``[n]`` array, ``_HEADER_BYTES``
  long whatever ``n`` (so it can be rewritten in place)."""
  text = f"{{'descr': '<i4', 'fortran_order': False, 'shape': ({n},), }}"
  body = _HEADER_BYTES - 10
  return (b"\x93NUMPY\x01\x00" + struct.pack("<H", body)
          + (text.ljust(body - 1) + "\n").encode("latin1"))


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _save(path: str, value: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, value)
    f.flush()
    os.fsync(f.fileno())


class _ShardWriter:
  """One shard: ids streamed to ``tokens.npy``, offsets kept."""

  def __init__(self, path: str, first: int):
    os.mkdir(path)
    self.path, self.first = path, first
    self._file = open(os.path.join(path, TOKENS), "wb")
    self._file.write(_npy_header(0))
    self._buffer = array.array("q")
    self._offsets = array.array("q", [0])
    self._prompt_lens = array.array("q")
    self.num_tokens = 0  # written and buffered

  def __len__(self) -> int:
    return len(self._prompt_lens)

  def add(self, prompt: Ids, completion: Ids) -> None:
    i = self.first + len(self)
    start = len(self._buffer)
    try:
      _extend(self._buffer, prompt)
      plen = len(self._buffer) - start
      _extend(self._buffer, completion)
    except (TypeError, OverflowError, ValueError) as e:
      raise ValueError(f"example {i}: token ids must be integers in "
                       f"[0, 2**31) ({e}).") from None
    n = len(self._buffer) - start
    self.num_tokens += n
    self._offsets.append(self.num_tokens)
    self._prompt_lens.append(plen)
    if len(self._buffer) >= _FLUSH_IDS:
      self._flush()

  def _flush(self) -> None:
    ids = np.frombuffer(self._buffer, np.int64)
    if ids.size:
      bad = np.flatnonzero((ids < 0) | (ids > _MAX_ID))
      if bad.size:
        token = self.num_tokens - ids.size + int(bad[0])
        j = bisect.bisect_right(self._offsets, token) - 1
        raise ValueError(f"example {self.first + j}: token id "
                         f"{int(ids[bad[0]])} is not in [0, 2**31).")
      self._file.write(ids.astype("<i4").tobytes())
    del ids
    self._buffer = array.array("q")

  def close(self) -> dict:
    self._flush()
    self._file.seek(0)
    self._file.write(_npy_header(self.num_tokens))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    _save(os.path.join(self.path, OFFSETS),
          np.frombuffer(self._offsets, np.int64))
    _save(os.path.join(self.path, PROMPT_LENS),
          np.frombuffer(self._prompt_lens, np.int64).astype(np.int32))
    _fsync_dir(self.path)
    return {"name": os.path.basename(self.path), "num_examples": len(self),
            "num_tokens": self.num_tokens}

  def abort(self) -> None:
    if not self._file.closed:
      self._file.close()


def _extend(buffer: array.array, ids: Ids) -> None:
  if isinstance(ids, np.ndarray):
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
      raise TypeError(f"an array of {ids.dtype} {ids.shape}, expected 1-D "
                      "integers")
    buffer.frombytes(np.ascontiguousarray(ids, np.int64).tobytes())
  else:
    buffer.extend(ids)


def _write(tmp: str, examples: Iterable[tuple[Ids, Ids]],
           shard_examples: int, manifest: dict) -> None:
  """Writes the shards and then the manifest into ``tmp``."""
  shards, writer, n, tokens = [], None, 0, 0
  try:
    for pair in examples:
      try:
        prompt, completion = pair
      except (TypeError, ValueError):
        raise ValueError(f"example {n} is not a (prompt_ids, completion_ids) "
                         "pair.") from None
      if writer is None:
        writer = _ShardWriter(os.path.join(tmp, f"shard-{len(shards):05d}"),
                              n)
      writer.add(prompt, completion)
      n += 1
      if len(writer) == shard_examples:
        shards.append(writer.close())
        tokens += writer.num_tokens
        writer = None
    if writer is not None:
      shards.append(writer.close())
      tokens += writer.num_tokens
      writer = None
  finally:
    if writer is not None:
      writer.abort()
  manifest.update(num_examples=n, num_tokens=tokens, shards=shards)
  path = os.path.join(tmp, MANIFEST)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  _fsync_dir(tmp)


def write_token_cache(directory: Union[str, os.PathLike],
                      examples: Iterable[tuple[Ids, Ids]], *,
                      fingerprint: Union[str, Mapping[str, Any]],
                      shard_examples: int = 1 << 20,
                      metadata: Optional[Mapping[str, Any]] = None,
                      on_mismatch: str = "error") -> TokenCache:
  """Writes ``examples`` to a token cache in ``directory`` (or reuses it).

  Args:
    directory: the cache's directory (its parents are made); the cache
      appears there by the final rename.
    examples: ``(prompt_ids, completion_ids)`` pairs (id sequences or 1-D
      integer arrays), e.g. ``zip(ex.prompts, ex.completions)`` of
      :func:`kdjax.lm.record_examples`, or a generator that tokenizes as it
      goes: iterated once, and only when the cache is (re)built.
    fingerprint: what the examples are made from: a string, or a JSON-able
      mapping of parts hashed by :func:`token_cache_fingerprint` (the parts
      name what differs on a mismatch). Include every input that changes
      the examples (tokenizer, data, ``seq_len``, template...).
    shard_examples: examples per shard (at least 1).
    metadata: JSON-able notes stored in the manifest (e.g. counts of skipped
      records); not compared.
    on_mismatch: when ``directory`` holds a cache of another fingerprint (or
      format version): ``"error"`` (raise) or ``"rebuild"`` (build a new one
      and replace it).

  Returns:
    The :class:`TokenCache`, opened.

  Raises:
    TokenCacheMismatchError: another fingerprint, with ``on_mismatch=
      "error"``.
    TokenCacheError: ``directory`` exists and is neither a token cache nor
      an empty directory (never overwritten).
    ValueError: a bad argument, or an example that is not a pair of integer
      ids in ``[0, 2**31)`` (nothing is left behind).
  """
  directory = os.path.abspath(os.fspath(directory))
  if on_mismatch not in ON_MISMATCH:
    raise ValueError(f"on_mismatch={on_mismatch!r}: use one of "
                     f"{ON_MISMATCH}.")
  if shard_examples < 1:
    raise ValueError(f"shard_examples ({shard_examples}) must be at least 1.")
  fp, parts = _fingerprint_of(fingerprint)
  if metadata is not None:
    metadata = json.loads(json.dumps(dict(metadata)))
  replace = False
  if os.path.exists(directory):
    if not os.path.isdir(directory):
      raise TokenCacheError(f"{directory} exists and is not a directory.")
    manifest = _read_manifest(directory)
    if manifest is None:
      if os.listdir(directory):
        raise TokenCacheError(
            f"{directory} exists and is not a token cache (no {MANIFEST}); "
            "refusing to write into it: give another directory or empty it.")
    else:
      why = _mismatch(directory, manifest, fp, parts)
      if why is None:
        return TokenCache(directory, manifest)
      if on_mismatch == "error":
        raise TokenCacheMismatchError(
            f"{why}. Delete the directory, give another one, or rebuild it "
            "(on_mismatch='rebuild').")
      replace = True
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
  os.mkdir(tmp)
  try:
    _write(tmp, examples, int(shard_examples),
           {"format": FORMAT, "version": VERSION, "fingerprint": fp,
            "fingerprint_parts": parts, "dtype": "int32",
            "metadata": metadata or {}})
    if replace:
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
      os.rename(directory, old)
      try:
        os.rename(tmp, directory)
      except OSError:
        os.rename(old, directory)  # the old cache back
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      try:
        os.rename(tmp, directory)  # replaces an empty directory only
      except OSError:
        # Another process got there first: reuse its cache if it agrees.
        manifest = _read_manifest(directory)
        if manifest is None or _mismatch(directory, manifest, fp, parts):
          raise
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return open_token_cache(directory)
