"""Reading a prepared dataset in training: each data-parallel rank reads only its rows of the global batch,
and where the run stands is one global cursor, so a run resumes exactly on any world size.

Pretraining. The token stream (every shard back to back) is cut into samples of seqLen + 1 tokens that
overlap by one: sample k holds tokens [k L, k L + L]. Sample k's targets are tokens k L + 1 .. k L + L, so
every token of an epoch is a target exactly once (the last partial batch of an epoch is dropped, as
Megatron and torchtitan do). Batch b of an epoch is samples [p(b) B, p(b) B + B) where p is a seeded
permutation of the epoch's batches (an affine bijection: O(1) memory for any dataset size), so rows of a
batch are contiguous in the stream and a rank's share is ONE ranged read. Rank r of W takes rows
[r B / W, (r + 1) B / W). Positions restart at every document start (and at the row start), which is how
the model masks attention across documents; a document's first token is not a target.

SFT. Conversations are placed best-fit (the paper's packing) in document order: each goes into the row with
the least room that still fits it, and the first one that fits nowhere starts the next batch. The plan
needs only document lengths (the index), so every rank computes the same plan and reads only its rows'
documents. The packing efficiency (filled / available tokens) is reported per step.

The cursor (`state_dict`) is (epoch, position): pretraining counts batches, SFT documents. The order is a
pure function of (seed, epoch, position), so per-rank shard and offset follow from it at any world size;
`where(rank, world)` names them for logs.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from flashops.trainers.errors import DataError


def rank_rows(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous rows [lo, hi) of a global batch (sizes differ by at most one)."""
    return rank * batch_size // world, (rank + 1) * batch_size // world


def affine_permutation(n: int, seed: int, epoch: int) -> tuple[int, int]:
    """(a, c) with gcd(a, n) = 1, so i -> (a i + c) mod n is a bijection of range(n)."""
    h = int.from_bytes(hashlib.sha256(f"flashops-data:{seed}:{epoch}".encode()).digest()[:16], "little")
    if n <= 1:
        return 1, 0
    a = h % n or 1
    while math.gcd(a, n) != 1:
        a = a % (n - 1) + 1
    return a, (h >> 64) % n


def segments(is_start: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and target mask of packed rows from where documents start in each row: positions restart at
    every document start and at the row start; a document's first token (<bos>) is never a target."""
    idx = np.arange(width)
    positions = np.empty((len(is_start), width), dtype=np.int64)
    mask = np.empty((len(is_start), width), dtype=np.int64)
    for r, starts in enumerate(is_start):
        s = np.array(starts, dtype=bool)
        mask[r] = ~s
        s[0] = True  # a row starts a new segment (RoPE is relative; attention stays within the row)
        positions[r] = idx - np.maximum.accumulate(np.where(s, idx, 0))
    return positions, mask


@dataclass
class LocalBatch:
    tokens: np.ndarray      # (rows, L + 1) int64: this rank's rows
    positions: np.ndarray   # (rows, L + 1) position within its document (0 at a document or row start)
    mask: np.ndarray        # (rows, L + 1) 1 where the token is a target
    targets: int            # target tokens in THIS rank's rows (the stage sums them over ranks: the loss normaliser)
    efficiency: float       # filled / available tokens of the global batch
    starts: list[int]       # global token offset of each local row's first token (tests check coverage)


class PretrainLoader:
    def __init__(self, ds, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 prefetch: bool = True):
        self.ds, self.L, self.B, self.seed, self.rank, self.world = ds, seq_len, batch_size, seed, rank, world
        self.samples = (ds.tokens - 1) // seq_len
        self.batches = self.samples // batch_size
        if self.batches < 1:
            raise DataError(f"prepared dataset {ds.uri} holds {ds.tokens} tokens; one batch of {batch_size} x "
                            f"{seq_len} needs {batch_size * seq_len + 1}: prepare more data or lower "
                            "training.batchSize / training.seqLen")
        self.cursor = 0  # batches consumed since the start of training (across epochs)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="data-prefetch") if prefetch else None
        self._ahead: tuple[int, Future] | None = None

    # the cursor
    def state_dict(self) -> dict:
        return {"data_cursor": self.cursor, "data_epoch": self.cursor // self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["data_cursor"])
        self._ahead = None

    def batch_start(self, cursor: int) -> int:
        """Global index of the first sample of the batch at `cursor`."""
        epoch, b = divmod(cursor, self.batches)
        a, c = affine_permutation(self.batches, self.seed, epoch)
        return ((a * b + c) % self.batches) * self.B

    def where(self, rank: int | None = None, world: int | None = None) -> dict:
        """The shard and offset a rank reads next (for logs; derived from the cursor)."""
        rank, world = self.rank if rank is None else rank, self.world if world is None else world
        lo, _ = rank_rows(self.B, rank, world)
        start = (self.batch_start(self.cursor) + lo) * self.L
        i = int(np.searchsorted(self.ds.token_starts, start, side="right")) - 1
        return {"epoch": self.cursor // self.batches, "shard": self.ds.shards[i].name,
                "offset": start - int(self.ds.token_starts[i])}

    def _read(self, cursor: int) -> LocalBatch:
        lo, hi = rank_rows(self.B, self.rank, self.world)
        first = self.batch_start(cursor) + lo
        n = hi - lo
        width = self.L + 1
        start = first * self.L
        span = n * self.L + 1 if n else 0
        flat = self.ds.read(start, span) if n else np.zeros(0, np.int64)
        doc_starts = self.ds.doc_starts_in(start, span) if n else np.zeros(0, np.int64)
        tokens = np.lib.stride_tricks.sliding_window_view(flat, width)[:: self.L] if n else np.zeros((0, width), np.int64)
        is_start = np.zeros(span, dtype=bool)
        is_start[doc_starts] = True
        rows = [is_start[r * self.L: r * self.L + width] for r in range(n)]
        positions, mask = segments(rows, width)
        return LocalBatch(np.ascontiguousarray(tokens), positions, mask, int(mask[:, 1:].sum()), 1.0,
                          [(first + r) * self.L for r in range(n)])

    def next_batch(self) -> LocalBatch:
        """This rank's rows of the next global batch (the one after it is fetched in the background)."""
        if self._ahead is not None and self._ahead[0] == self.cursor:
            batch = self._ahead[1].result()
        else:
            batch = self._read(self.cursor)
        self.cursor += 1
        if self._pool is not None:
            self._ahead = (self.cursor, self._pool.submit(self._read, self.cursor))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class SFTLoader:
    """Best-fit packing of prepared conversations (tokens + assistant mask)."""

    def __init__(self, ds, seq_len: int, batch_size: int, rank: int = 0, world: int = 1, packing: str = "best-fit"):
        self.ds, self.L, self.B, self.rank, self.world, self.packing = ds, seq_len, batch_size, rank, world, packing
        if ds.documents < 1:
            raise DataError(f"prepared dataset {ds.uri} holds no documents: prepare it from non-empty rows")
        self.cursor, self.epoch = 0, 0  # next document of the epoch

    def state_dict(self) -> dict:
        return {"data_cursor": self.cursor, "data_epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.epoch = int(state["data_cursor"]), int(state["data_epoch"])

    def where(self, rank: int | None = None, world: int | None = None) -> dict:
        d = min(self.cursor, self.ds.documents - 1)
        i = int(np.searchsorted(self.ds.doc_first, d, side="right")) - 1
        return {"epoch": self.epoch, "shard": self.ds.shards[i].name, "document": d - int(self.ds.doc_first[i])}

    def plan(self) -> tuple[list[list[int]], int]:
        """Rows of document ids for the next batch (same on every rank) and the next cursor."""
        width = self.L + 1
        d, end = self.cursor, self.ds.documents
        lengths = np.minimum(self.ds.doc_lengths(d, min(end, d + self.B * width)), width)
        rows: list[list[int]] = [[] for _ in range(self.B)]
        room = [width] * self.B
        for k, n in enumerate(lengths):
            if self.packing == "none":
                if k >= self.B:
                    break
                rows[k].append(d + k)
                room[k] -= int(n)
                continue
            fits = [(room[i], i) for i in range(self.B) if room[i] >= n]
            if not fits:
                break
            _, best = min(fits)
            rows[best].append(d + k)
            room[best] -= int(n)
        used = sum(len(r) for r in rows)
        return rows, d + used

    def next_batch(self) -> LocalBatch:
        width = self.L + 1
        rows, nxt = self.plan()
        lo, hi = rank_rows(self.B, self.rank, self.world)
        tokens = np.full((hi - lo, width), 2, dtype=np.int64)  # <pad> (id 2)
        positions = np.zeros((hi - lo, width), dtype=np.int64)
        mask = np.zeros((hi - lo, width), dtype=np.int64)
        starts = []
        for r, docs in enumerate(rows[lo:hi]):
            at = 0
            for d in docs:
                s, n = self.ds.document(d)
                n = min(n, width - at)
                tokens[r, at:at + n] = self.ds.read(s, n)
                mask[r, at:at + n] = self.ds.read_mask(s, n)
                positions[r, at:at + n] = np.arange(n)
                starts.append(s)
                at += n
        filled = sum(min(self.ds.document(d)[1], width) for docs in rows for d in docs)
        self.cursor = nxt
        if self.cursor >= self.ds.documents:
            self.cursor, self.epoch = 0, self.epoch + 1
        return LocalBatch(tokens, positions, mask, int(mask[:, 1:].sum()), filled / (self.B * width), starts)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ raw rows

STREAM_WINDOW = 8  # SFT on raw rows: conversations a row stream holds to fill its row best-fit
CURSOR_COLS = 3 + 2 * STREAM_WINDOW  # per stream: epoch, position, token offset | pending, then (epoch, position)s
EMPTY_EPOCHS = 3   # a row stream that finds no row in this many epochs in a row: too little data for the batch
OPEN_STREAMS = 256  # readers a rank keeps open (file handles, buffers); more streams reopen at their position


class RawStreams:
    """Raw rows (corpora.RawDataset) read as one stream per row of the global batch. Stream j of B reads, in
    every epoch, the rows that start in units [j U / B, (j + 1) U / B) of that epoch's unit space (the shards
    end to end in the epoch's seeded order; units are JSONL bytes or Parquet rows), then moves on to its range
    of the next epoch. Rank r of W owns the streams of its rows of the batch (`rank_rows`), so it reads only
    its 1/W of the data, in ranged reads, one open reader per stream. What a batch holds does not depend on
    the world size, and a stream's cursor is (epoch, position): a checkpoint holds B of them, so a run resumes
    exactly on any world size, and each epoch reads every row exactly once."""

    def __init__(self, ds, streams: int, rank: int = 0, world: int = 1):
        self.ds, self.n = ds, streams
        self.lo, self.hi = rank_rows(streams, rank, world)
        if ds.total < streams:
            raise DataError(f"data.uri {ds.uri!r} holds {ds.total} rows; training.batchSize {streams} reads each "
                            "batch row from its own share of the data: add data or lower training.batchSize")
        self.pos = {j: [0, self.range(j)[0]] for j in self.owned}
        self._gen: OrderedDict = OrderedDict()  # the open readers, least recently used first

    @property
    def owned(self) -> range:
        return range(self.lo, self.hi)

    def range(self, j: int) -> tuple[int, int]:
        return j * self.ds.total // self.n, (j + 1) * self.ds.total // self.n

    def seek(self, j: int, epoch: int, pos: int) -> None:
        self._drop(j)
        self.pos[j] = [int(epoch), int(pos)]

    def _drop(self, j: int) -> None:
        gen = self._gen.pop(j, None)
        if gen is not None:
            gen.close()

    def next(self, j: int) -> tuple[int, int, dict]:
        """(epoch, position, row) of stream j's next row (checked for the stage's keys)."""
        from flashops.trainers.corpora import check_row

        empty = 0
        while True:
            gen = self._gen.get(j)
            if gen is None:
                epoch, pos = self.pos[j]
                gen = self._gen[j] = self.ds.read(epoch, pos, self.range(j)[1])
                if len(self._gen) > OPEN_STREAMS:
                    self._drop(next(iter(self._gen)))
            self._gen.move_to_end(j)
            item = next(gen, None)
            if item is not None:
                pos, end, row = item
                epoch = self.pos[j][0]
                self.pos[j][1] = end
                check_row(row, self.ds.stage, self.ds.describe(epoch, pos))
                return epoch, pos, row
            empty += 1
            if empty > EMPTY_EPOCHS:
                raise DataError(f"data.uri {self.ds.uri!r}: batch row {j} of {self.n} found no row in its share of "
                                f"the data ({EMPTY_EPOCHS} epochs): too few rows for training.batchSize {self.n}; "
                                "add data or lower training.batchSize")
            self.seek(j, self.pos[j][0] + 1, self.range(j)[0])

    def row_at(self, epoch: int, pos: int) -> dict:
        """The row at (epoch, position): a resumed SFT stream re-reads the conversations it held."""
        gen = self.ds.read(epoch, pos, pos + 1)
        try:
            return next(gen)[2]
        finally:
            gen.close()

    def where(self) -> dict:
        j = self.lo
        if j >= self.hi:
            return {}
        epoch, pos = self.pos[j]
        shard, off = self.ds.where(epoch, pos)
        return {"stream": j, "epoch": epoch, "shard": shard.uri, "offset": off}

    def close(self) -> None:
        for j in list(self._gen):
            self._drop(j)


class _RawLoader:
    per_rank = True  # state_dict fills only this rank's streams: the stage sums the tables over ranks

    def __init__(self, ds, seq_len: int, batch_size: int, rank: int, world: int, encode):
        self.streams = RawStreams(ds, batch_size, rank, world)
        self.ds, self.L, self.B, self.encode = ds, seq_len, batch_size, encode

    def state_dict(self) -> dict:
        table = np.zeros((self.B, CURSOR_COLS), dtype=np.int64)
        for j in self.streams.owned:
            table[j] = self._cursor(j)
        return {"data_streams": table}

    def load_state_dict(self, state: dict) -> None:
        table = np.asarray(state["data_streams"], dtype=np.int64)
        if table.shape != (self.B, CURSOR_COLS):
            raise DataError(f"the checkpoint's data cursor has shape {table.shape}, this run needs {(self.B, CURSOR_COLS)} "
                            "(training.batchSize changed?): resume with the same batch size")
        for j in self.streams.owned:
            self._restore(j, table[j])

    def _cursor(self, j: int) -> np.ndarray:
        row = np.full(CURSOR_COLS, -1, dtype=np.int64)
        row[:2] = self.streams.pos[j]
        row[2] = 0
        return row

    def _restore(self, j: int, row: np.ndarray) -> None:
        self.streams.seek(j, row[0], row[1])

    def where(self, rank: int | None = None, world: int | None = None) -> dict:
        return self.streams.where()

    def close(self) -> None:
        self.streams.close()


class RawPretrainLoader(_RawLoader):
    """Pretraining on raw rows: each batch row is its own stream's documents back to back, cut into rows of
    seqLen + 1 tokens that overlap by one (as PretrainLoader), so every token of a stream is a target exactly
    once; a document that does not fit continues in the stream's next row. Cursor: (epoch, position, token
    offset) of the token the stream's next row starts with."""

    def __init__(self, ds, seq_len: int, batch_size: int, rank: int, world: int, encode):
        super().__init__(ds, seq_len, batch_size, rank, world, encode)
        self.buf = {j: [] for j in self.streams.owned}  # [epoch, position, token ids] read ahead of the cursor
        self.off = {j: 0 for j in self.streams.owned}

    def _cursor(self, j: int) -> np.ndarray:
        row = super()._cursor(j)
        if self.buf[j]:
            row[:2] = self.buf[j][0][0], self.buf[j][0][1]
        row[2] = self.off[j]  # (also right after a resume, before the stream has read its document again)
        return row

    def _restore(self, j: int, row: np.ndarray) -> None:
        super()._restore(j, row)
        self.buf[j], self.off[j] = [], int(row[2])

    def _row(self, j: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        width, buf = self.L + 1, self.buf[j]
        toks, starts, k, off = [], [], 0, self.off[j]
        got = 0
        while got < width:
            if k == len(buf):
                epoch, pos, row = self.streams.next(j)
                buf.append((epoch, pos, np.asarray(self.encode(row)[0], dtype=np.int64)))
            ids = buf[k][2][off: off + width - got]
            s = np.zeros(len(ids), dtype=bool)
            s[0] = off == 0
            toks.append(ids)
            starts.append(s)
            got += len(ids)
            k, off = k + 1, 0
        first = (buf[0][0], buf[0][1], self.off[j])
        advance, off = self.L, self.off[j]  # the next row starts at this row's last token
        while advance:
            left = len(buf[0][2]) - off
            if left > advance:
                off, advance = off + advance, 0
            else:
                advance -= left
                buf.pop(0)
                off = 0
        self.off[j] = off
        return np.concatenate(toks), np.concatenate(starts), first

    def next_batch(self) -> LocalBatch:
        rows = [self._row(j) for j in self.streams.owned]
        width = self.L + 1
        tokens = np.stack([r[0] for r in rows]) if rows else np.zeros((0, width), np.int64)
        positions, mask = segments([r[1] for r in rows], width)
        return LocalBatch(tokens, positions, mask, int(mask[:, 1:].sum()), 1.0, [r[2] for r in rows])


class RawSFTLoader(_RawLoader):
    """SFT on raw rows: each batch row is filled from its stream best-fit over a window of STREAM_WINDOW
    conversations (the largest that still fits goes in next; a conversation longer than a row is cut to it),
    so nothing is dropped. Cursor: the stream's position and the (epoch, position) of the conversations it
    holds, which a resumed run re-reads."""

    def __init__(self, ds, seq_len: int, batch_size: int, rank: int, world: int, encode, packing: str = "best-fit"):
        super().__init__(ds, seq_len, batch_size, rank, world, encode)
        self.window = 1 if packing == "none" else STREAM_WINDOW
        self.packing = packing
        self.pending = {j: [] for j in self.streams.owned}  # [epoch, position, ids, mask]

    def _take(self, j: int, epoch: int, pos: int, row: dict) -> tuple:
        ids, mask = self.encode(row)
        return epoch, pos, np.asarray(ids[: self.L + 1], np.int64), np.asarray(mask[: self.L + 1], np.int64)

    def _cursor(self, j: int) -> np.ndarray:
        row = super()._cursor(j)
        row[2] = len(self.pending[j])
        for k, (epoch, pos, _, _) in enumerate(self.pending[j]):
            row[3 + 2 * k: 5 + 2 * k] = epoch, pos
        return row

    def _restore(self, j: int, row: np.ndarray) -> None:
        super()._restore(j, row)
        held = [(int(row[3 + 2 * k]), int(row[4 + 2 * k])) for k in range(int(row[2]))]
        self.pending[j] = [self._take(j, e, p, self.streams.row_at(e, p)) for e, p in held]

    def _row(self, j: int) -> list[tuple]:
        pending, room, placed = self.pending[j], self.L + 1, []
        while True:
            while len(pending) < self.window:
                pending.append(self._take(j, *self.streams.next(j)))
            fits = [k for k, d in enumerate(pending) if len(d[2]) <= room]
            if not fits or (self.packing == "none" and placed):
                return placed
            best = max(fits, key=lambda k: len(pending[k][2]))  # the largest that fits; the earliest of equals
            placed.append(pending.pop(best))
            room -= len(placed[-1][2])

    def next_batch(self) -> LocalBatch:
        width = self.L + 1
        n = len(self.streams.owned)
        tokens = np.full((n, width), 2, dtype=np.int64)  # <pad> (id 2)
        positions = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        starts = []
        for r, j in enumerate(self.streams.owned):
            at = 0
            for epoch, pos, ids, m in self._row(j):
                tokens[r, at:at + len(ids)] = ids
                mask[r, at:at + len(ids)] = m
                positions[r, at:at + len(ids)] = np.arange(len(ids))
                starts.append((epoch, pos))
                at += len(ids)
        filled = int((tokens != 2).sum())
        return LocalBatch(tokens, positions, mask, int(mask[:, 1:].sum()), filled / max(1, n * width), starts)


class RawRowsLoader(_RawLoader):
    """DPO on raw rows: batch row j is stream j's next row."""

    def __init__(self, ds, batch_size: int, rank: int, world: int):
        super().__init__(ds, 0, batch_size, rank, world, None)

    def next_rows(self) -> list[dict]:
        return [self.streams.next(j)[2] for j in self.streams.owned]
