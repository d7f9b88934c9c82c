"""A teacher's top-k outputs for a whole corpus, written once and memory-mapped for reading by token range.

Offline distillation of a language model computes the teacher once per corpus: for every token,
the ``k`` most likely next tokens and their log-probabilities (and the probability mass left
outside them). :class:`TeacherTopK` stores those as flat binary arrays in a directory and reads a
token range back without loading the rest; :func:`kdloss.functional.sparse_kd` consumes them.

Layout of a store directory::

    meta.json        format, number of tokens, k, vocabulary size, dtypes, user metadata,
                     and the SHA-256 of every array file (checked by :meth:`TeacherTopK.verify`)
    logprobs.bin     (tokens, k) log-probabilities at temperature 1, descending per token
    indices.bin      (tokens, k) int32 (int64 for vocabularies of 2**31 or more) classes
    tail.bin         (tokens,) float32 mass outside the top-k (optional)

The arrays are raw little-endian (the host's) tensors, mapped with :func:`torch.from_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from kdloss._validate import ShapeError, check_float, check_integer, check_positive_int

__all__ = ["TeacherTopK", "TeacherTopKWriter"]

FORMAT = "kdloss.teacher_topk/1"
_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INDEX_DTYPES = {"int32": torch.int32, "int64": torch.int64}
_FILES = ("logprobs.bin", "indices.bin", "tail.bin")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _map(path: Path, numel: int, dtype: torch.dtype, *, writable: bool) -> Tensor:
    """A 1-D tensor over the file's bytes (shared with the file when ``writable``, else copy-on-write)."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.from_file(str(path), shared=writable, size=numel, dtype=dtype)


class TeacherTopKWriter:
    """Writes a :class:`TeacherTopK` store token by token; made by :meth:`TeacherTopK.create`.

    The arrays are written into a temporary directory beside ``path``; :meth:`close` checks that
    every token was written, flushes the files to disk and renames the directory to ``path`` (an
    existing store there is replaced only with ``overwrite=True``). A writer that is not closed
    (an exception inside its ``with`` block, or :meth:`abort`) leaves nothing behind: a store at
    ``path`` is always complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_tokens: int,
        k: int,
        vocab_size: int,
        values_dtype: torch.dtype = torch.float32,
        with_tail: bool = True,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        check_positive_int("k", k)
        check_positive_int("vocab_size", vocab_size)
        if k > vocab_size:
            raise ValueError(f"k must be <= vocab_size, got k={k} and vocab_size={vocab_size}")
        if values_dtype not in _VALUE_DTYPES.values():
            raise TypeError(f"values_dtype must be one of {', '.join(_VALUE_DTYPES)}, got {values_dtype}")
        if metadata is not None:
            try:
                json.dumps(metadata)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metadata must be JSON-serialisable, got {metadata!r}: {e}") from e
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{str(self.path)!r} exists: pass overwrite=True to replace it, or choose another path"
            )
        self.num_tokens, self.k, self.vocab_size = num_tokens, k, vocab_size
        self.values_dtype = values_dtype
        self.index_dtype = torch.int32 if vocab_size < 2**31 else torch.int64
        self.with_tail, self.overwrite = with_tail, overwrite
        self.metadata = dict(metadata or {})
        self.written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp: Path | None = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        sizes = {
            "logprobs.bin": (num_tokens * k, values_dtype),
            "indices.bin": (num_tokens * k, self.index_dtype),
        }
        if with_tail:
            sizes["tail.bin"] = (num_tokens, torch.float32)
        self._arrays: dict[str, Tensor] = {}
        try:
            for name, (numel, dtype) in sizes.items():
                file = self._tmp / name
                with file.open("wb") as f:
                    f.truncate(numel * torch.empty((), dtype=dtype).element_size())
                self._arrays[name] = _map(file, numel, dtype, writable=True)
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ writing

    def add_logits(self, logits: Tensor) -> None:
        """Append the top-k of the teacher's next-token logits ``(*, V)`` (one row per token, in order).

        The log-softmax runs in float32 on the logits' device; the tail is the mass of the other
        ``V - k`` classes, computed from their logits (no ``1 - sum`` cancellation).
        """
        check_float("logits", logits)
        if logits.ndim < 1 or logits.shape[-1] != self.vocab_size:
            raise ShapeError(
                f"logits must have shape (*, V) with V = vocab_size = {self.vocab_size}, got {tuple(logits.shape)}"
            )
        with torch.no_grad():
            lp = torch.log_softmax(logits.detach().reshape(-1, self.vocab_size).float(), dim=-1)
            values, indices = lp.topk(self.k, dim=-1)
            tail: Tensor | None = None
            if self.with_tail:
                if self.k < self.vocab_size:
                    tail = lp.scatter(1, indices, float("-inf")).logsumexp(dim=-1).exp()
                else:
                    tail = torch.zeros(lp.shape[0], device=lp.device)
        self.add_topk(values, indices, tail)

    def add_topk(self, logprobs: Tensor, indices: Tensor, tail: Tensor | None = None) -> None:
        """Append top-k ``logprobs`` and ``indices`` of shape ``(*, k)`` (and ``tail (*)`` when the store has one)."""
        if self._tmp is None:
            raise RuntimeError(f"the writer of {str(self.path)!r} is closed")
        check_float("logprobs", logprobs)
        check_integer("indices", indices)
        if logprobs.shape != indices.shape or logprobs.ndim < 1 or logprobs.shape[-1] != self.k:
            raise ShapeError(
                f"logprobs and indices must have the same shape (*, k) with k = {self.k}, got "
                f"{tuple(logprobs.shape)} and {tuple(indices.shape)}"
            )
        if self.with_tail:
            if tail is None:
                raise ValueError(
                    "this store holds the tail mass (with_tail=True): pass tail, or create it with_tail=False"
                )
            check_float("tail", tail)
            if tail.shape != logprobs.shape[:-1]:
                raise ShapeError(f"tail must have shape {tuple(logprobs.shape[:-1])}, got {tuple(tail.shape)}")
        elif tail is not None:
            raise ValueError("this store has no tail (with_tail=False): pass tail=None, or create it with_tail=True")
        rows = logprobs.numel() // self.k
        if self.written + rows > self.num_tokens:
            raise ValueError(
                f"the store was created for {self.num_tokens} tokens; {self.written} are written and "
                f"{rows} more do not fit"
            )
        idx = indices.detach().reshape(-1, self.k).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(
                f"indices must lie in [0, {self.vocab_size}), got values in [{int(idx.min())}, {int(idx.max())}]"
            )
        a, b = self.written * self.k, (self.written + rows) * self.k
        self._arrays["logprobs.bin"][a:b] = logprobs.detach().reshape(-1).cpu().to(self.values_dtype)
        self._arrays["indices.bin"][a:b] = idx.reshape(-1).to(self.index_dtype)
        if tail is not None:
            self._arrays["tail.bin"][self.written : self.written + rows] = tail.detach().reshape(-1).cpu().float()
        self.written += rows

    # ------------------------------------------------------------------ finishing

    def close(self) -> TeacherTopK:
        """Check that every token was written, commit the store atomically, and open it for reading."""
        if self._tmp is None:
            raise RuntimeError(f"the writer of {str(self.path)!r} is already closed")
        if self.written != self.num_tokens:
            n = self.written
            self.abort()
            raise ValueError(
                f"{n} of the {self.num_tokens} tokens were written: the store at {str(self.path)!r} was not "
                "created (write every token, or create it for fewer)"
            )
        tmp = self._tmp
        self._arrays.clear()  # unmap before flushing
        digests = {name: _sha256(tmp / name) for name in _FILES if (tmp / name).exists()}
        meta = {
            "format": FORMAT,
            "num_tokens": self.num_tokens,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "values": "log-probabilities at temperature 1, descending per token",
            "values_dtype": _dtype_name(self.values_dtype),
            "indices_dtype": _dtype_name(self.index_dtype),
            "tail": self.with_tail,
            "byteorder": sys.byteorder,
            "sha256": digests,
            "metadata": self.metadata,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for name in (*_FILES, "meta.json"):
            file = tmp / name
            if file.exists():
                with file.open("rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        old: Path | None = None
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise FileExistsError(f"{str(self.path)!r} appeared while writing: pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
            os.replace(self.path, old / "store")
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return TeacherTopK(self.path)

    def abort(self) -> None:
        """Drop what was written (the temporary directory); ``path`` is left as it was."""
        self._arrays.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TeacherTopKWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._tmp is not None:
            self.close()


class TeacherTopK:
    """A memory-mapped store of a teacher's top-k next-token log-probabilities, read by token range.

    Create one with :meth:`create` (a :class:`TeacherTopKWriter`: ``add_logits`` per teacher
    batch, in token order), open it with ``TeacherTopK(path)``; :meth:`read` returns the
    ``(logprobs, indices, tail)`` of tokens ``[start, stop)`` as :func:`kdloss.functional.sparse_kd`
    takes them. Only the pages of the range read are loaded from disk. Writes are atomic: the store
    appears at ``path`` complete or not at all. Opening checks the sizes of the files, not their
    bytes (that would read the whole store); :meth:`verify` checks every byte against the SHA-256
    recorded when the store was written, e.g. before reusing a store from an earlier run.

    Args:
        path: a store directory written by :class:`TeacherTopKWriter`.

    Attributes:
        num_tokens, k, vocab_size: the store's sizes (``len(store)`` is ``num_tokens``).
        has_tail: whether the mass outside the top-k is stored.
        metadata: the user metadata given when it was written (a dict).

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: not a store of this format, a truncated file, or another byte order.

    Example:
        >>> import tempfile, torch
        >>> from kdloss import TeacherTopK
        >>> from kdloss.functional import sparse_kd
        >>> root = tempfile.mkdtemp()
        >>> teacher_logits = torch.randn(10, 50)  # 10 tokens of a corpus, V = 50
        >>> with TeacherTopK.create(f"{root}/store", num_tokens=10, k=8, vocab_size=50) as w:
        ...     w.add_logits(teacher_logits[:6])  # one teacher batch at a time
        ...     w.add_logits(teacher_logits[6:])
        >>> store = TeacherTopK(f"{root}/store")
        >>> len(store), store.k
        (10, 8)
        >>> logprobs, indices, tail = store.read(2, 5)
        >>> logprobs.shape, indices.dtype, tail.shape
        (torch.Size([3, 8]), torch.int64, torch.Size([3]))
        >>> student = torch.randn(3, 50, requires_grad=True)
        >>> sparse_kd(student, logprobs, indices, teacher_tail=tail).backward()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no teacher store at {str(self.path)!r} (expected {str(meta_file)!r})")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as e:
            raise ValueError(f"{str(meta_file)!r} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{str(self.path)!r} is not a teacher store of format {FORMAT!r} (format: {got!r})")
        if meta.get("byteorder", sys.byteorder) != sys.byteorder:
            raise ValueError(
                f"{str(self.path)!r} was written on a {meta['byteorder']}-endian host; this one is {sys.byteorder}"
            )
        self.num_tokens: int = int(meta["num_tokens"])
        self.k: int = int(meta["k"])
        self.vocab_size: int = int(meta["vocab_size"])
        self.has_tail: bool = bool(meta["tail"])
        self.metadata: dict[str, Any] = dict(meta.get("metadata", {}))
        self.values_dtype = _VALUE_DTYPES[meta["values_dtype"]]
        self.index_dtype = _INDEX_DTYPES[meta["indices_dtype"]]
        expect = {
            "logprobs.bin": (self.num_tokens * self.k, self.values_dtype),
            "indices.bin": (self.num_tokens * self.k, self.index_dtype),
        }
        if self.has_tail:
            expect["tail.bin"] = (self.num_tokens, torch.float32)
        digests = meta.get("sha256", {})
        self._digests: dict[str, str] = dict(digests) if isinstance(digests, dict) else {}
        self._arrays: dict[str, Tensor] = {}
        for name, (numel, dtype) in expect.items():
            file = self.path / name
            want = numel * torch.empty((), dtype=dtype).element_size()
            if not file.is_file():
                raise ValueError(f"teacher store {str(self.path)!r} is missing {name}")
            have = file.stat().st_size
            if have != want:
                raise ValueError(
                    f"{str(file)!r} has {have} bytes, expected {want} ({numel} x {_dtype_name(dtype)}): "
                    "truncated, or not written by this store"
                )
            self._arrays[name] = _map(file, numel, dtype, writable=False)

    def verify(self) -> None:
        """Read every array file and compare it with the SHA-256 recorded when the store was written.

        Raises:
            ValueError: a file whose bytes changed since (naming it), or a store written without
                checksums.
        """
        for name in self._arrays:
            want = self._digests.get(name)
            if want is None:
                raise ValueError(
                    f"teacher store {str(self.path)!r} has no checksum for {name}: it cannot be verified; "
                    "write it again"
                )
            have = _sha256(self.path / name)
            if have != want:
                raise ValueError(
                    f"{str(self.path / name)!r} does not match its checksum (SHA-256 {have[:16]}..., "
                    f"recorded {want[:16]}...): the store is corrupt; write it again"
                )

    @staticmethod
    def create(
        path: str | os.PathLike[str],
        *,
        num_tokens: int,
        k: int,
        vocab_size: int,
        values_dtype: torch.dtype = torch.float32,
        with_tail: bool = True,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> TeacherTopKWriter:
        """A writer for a new store of ``num_tokens`` tokens (see :class:`TeacherTopKWriter`).

        Args:
            path: the store directory to create (its parent is created if needed).
            num_tokens: how many tokens will be written (every one of them, before ``close``).
            k: classes kept per token, ``1 <= k <= vocab_size``.
            vocab_size: the teacher's vocabulary size ``V``.
            values_dtype: dtype of the stored log-probabilities (float32, float16 or bfloat16).
            with_tail: also store the mass outside the top-k (4 bytes per token).
            overwrite: replace an existing store at ``path`` when the new one is complete.
            metadata: JSON-serialisable facts to keep with it (corpus, teacher checkpoint...).
        """
        return TeacherTopKWriter(
            path,
            num_tokens=num_tokens,
            k=k,
            vocab_size=vocab_size,
            values_dtype=values_dtype,
            with_tail=with_tail,
            overwrite=overwrite,
            metadata=metadata,
        )

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TeacherTopK({str(self.path)!r}, num_tokens={self.num_tokens}, k={self.k}, "
            f"vocab_size={self.vocab_size}, tail={self.has_tail})"
        )

    def read(
        self, start: int, stop: int, *, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The tokens ``[start, stop)``: ``logprobs (n, k)`` float32, ``indices (n, k)`` int64, ``tail (n,)`` or None.

        Only the range's pages are read from disk; the tensors are copies on ``device`` (default CPU).

        Raises:
            TypeError: ``start``/``stop`` not ints.
            IndexError: a range outside ``[0, num_tokens]`` or with ``stop < start``.
        """
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(
                f"token range [{start}, {stop}) is outside the store's [0, {self.num_tokens}) (or stop < start)"
            )
        k = self.k
        lp = (
            self._arrays["logprobs.bin"][start * k : stop * k]
            .view(-1, k)
            .to(device=device, dtype=torch.float32, copy=True)
        )
        idx = (
            self._arrays["indices.bin"][start * k : stop * k]
            .view(-1, k)
            .to(device=device, dtype=torch.int64, copy=True)
        )
        tail = None
        if self.has_tail:
            tail = self._arrays["tail.bin"][start:stop].to(device=device, copy=True)
        return lp, idx, tail

    def __getitem__(self, index: slice) -> tuple[Tensor, Tensor, Tensor | None]:
        """``store[a:b]`` is ``store.read(a, b)`` (a step other than 1 is refused)."""
        if not isinstance(index, slice):
            raise TypeError(f"a store is read by token range, store[start:stop]; got {type(index).__name__}")
        start, stop, step = index.indices(self.num_tokens)
        if step != 1:
            raise ValueError(f"a token range has step 1, got {step}")
        return self.read(start, max(start, stop))
