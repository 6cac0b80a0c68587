"""Inputs at a URI (s3://...) as local files for the decoders, which need one: per-row scratch copies,
fetched when a stage first reads the path, shared by the rows of a batch that name the same file and, within
a chain of stages (`chain_copies`), kept for the chain's later stages up to a byte budget."""
from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter

from latentforge.datasets import storage, video

# Columns naming an input file. Decoders (PIL, decord, PyAV, soundfile) need a local file, so for inputs at a
# URI (s3://...) these are staged per row; see StagedRow.
PATH_COLUMNS = ("uri", "caption_path")


class BatchCopies:
    """Scratch copies of remote inputs, shared by the rows of one batch that read the same file (a video's
    clips): fetched on the first read, deleted once the last of those rows is done. Without it each clip of a
    video fetched the whole video again, in every stage that decodes it.

    With `keep_bytes`, copies fetched while the kept ones total at most that many bytes outlive their rows
    until `close()`: a chain's later stages find them (see chain_copies). Beyond it a copy goes with its last
    row, as without, so the scratch a worker holds stays bounded whatever the batch's files weigh."""

    def __init__(self, keep_bytes: int = 0) -> None:
        self.keep_bytes = keep_bytes
        self._users: Counter[str] = Counter()  # URI -> rows not done with it yet
        self._copies: dict[str, tuple[contextlib.ExitStack, str]] = {}
        self._kept: set[str] = set()
        self._kept_bytes = 0

    def expect(self, uri: str) -> None:
        self._users[uri] += 1

    def path(self, uri: str) -> str:
        if uri not in self._copies:
            stack = contextlib.ExitStack()
            local = str(stack.enter_context(storage.local_copy(uri)))
            self._copies[uri] = (stack, local)
            size = os.path.getsize(local) if os.path.isfile(local) else 0
            if self._kept_bytes + size <= self.keep_bytes:
                self._kept.add(uri)
                self._kept_bytes += size
        return self._copies[uri][1]

    def release(self, uri: str) -> None:
        self._users[uri] -= 1
        if self._users[uri] <= 0 and uri in self._copies and uri not in self._kept:
            self._delete(*self._copies.pop(uri))

    def close(self) -> None:
        for stack, local in self._copies.values():
            self._delete(stack, local)
        self._copies.clear()
        self._kept.clear()
        self._kept_bytes = 0

    @staticmethod
    def _delete(stack: contextlib.ExitStack, local: str) -> None:
        video.READERS.forget(local)  # a kept decoder's open handle would hold the deleted file's disk space
        stack.close()


_chain = threading.local()


@contextlib.contextmanager
def chain_copies(keep_bytes: int):
    """Within the block, the stages this thread runs (a StageChain's batch) share one BatchCopies keeping up to
    `keep_bytes` of copies, deleted when the block ends: a video on s3 is fetched once for the probe, the clip
    split, the hash, the scores and the encoder of one chain instead of once by each of them. Per thread: a
    chain's batch runs on one thread, and a worker running two batches at once keeps them apart."""
    copies = BatchCopies(keep_bytes)
    outer = getattr(_chain, "copies", None)
    _chain.copies = copies
    try:
        yield copies
    finally:
        _chain.copies = outer
        copies.close()


def current_copies() -> BatchCopies | None:
    """The copies of the chain this thread is running (chain_copies), if any."""
    return getattr(_chain, "copies", None)


class StagedRow(dict):
    """A row whose remote input columns read as local scratch copies, fetched on first read: a stage that
    never opens the file (a threshold filter, the text encoder) downloads nothing. `close()` deletes them.

    Copies of the row (`{**row}`, `dict(row)`) keep the URIs: only reading a column gives the local path.
    Staged per batch, not cached per node: a later map may run on another node, and the copies a worker holds
    stay at one batch of inputs whatever the corpus size (the price: each map that decodes the file fetches it
    again). Rows of one batch that name the same file share its copy, and so do the stages of one chain within
    its byte budget (`BatchCopies`, `chain_copies`)."""

    def __init__(self, row: dict, shared: BatchCopies | None = None):
        super().__init__(row)
        self._shared = shared if shared is not None else BatchCopies()
        self._owns_copies = shared is None
        self._local: dict[str, str] = {}
        self._remote = [str(v) for k, v in row.items() if k in PATH_COLUMNS and storage.is_remote(str(v))]
        for uri in self._remote:
            self._shared.expect(uri)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key not in PATH_COLUMNS or not storage.is_remote(str(value)):
            return value
        if key not in self._local:
            self._local[key] = self._shared.path(str(value))
        return self._local[key]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def in_terms_of_uris(self, message: str) -> str:
        """A decoder's message with each scratch path replaced by the URI it stands for."""
        for key, local in self._local.items():
            message = message.replace(local, str(dict.__getitem__(self, key)))
        return message

    def close(self) -> None:
        """Done with this row's files: a copy no other row of the batch still needs is deleted."""
        remote, self._remote = self._remote, []
        for uri in remote:
            self._shared.release(uri)
        if self._owns_copies:
            self._shared.close()


def staged_row(row: dict, shared: BatchCopies | None = None) -> dict:
    remote = any(storage.is_remote(str(dict.get(row, c))) for c in PATH_COLUMNS if c in row)
    return StagedRow(row, shared) if remote else row


@contextlib.contextmanager
def staged(row: dict):
    """For stages that read inputs outside `map_ok_rows`: `with staged(row) as r: decode(r["uri"])`."""
    row = staged_row(row, current_copies())
    try:
        yield row
    finally:
        if isinstance(row, StagedRow):
            row.close()
