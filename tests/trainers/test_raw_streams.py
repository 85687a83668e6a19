"""Raw (not prepared) rows under a prefix or glob, read per rank: one row stream per batch row, each reading
its own range of the epoch's unit space. Every row exactly once per epoch at 1 and 2 ranks, a seeded shard
order per epoch, bounded ranged reads (no whole-shard read), and exact resume on another world size."""
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashops.trainers import corpora
from flashops.trainers.corpora import RawDataset, list_shards, open_dataset
from flashops.trainers.errors import DataError
from flashops.trainers.loader import RawPretrainLoader, RawRowsLoader, RawSFTLoader, RawStreams


def write_raw(root, jsonl_shards=4, rows=30, parquet_rows=45):
    """JSONL shards of uneven lines and one Parquet shard of several row groups, under one prefix."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(jsonl_shards):
        lines = [json.dumps({"text": f"s{s} d{i} " + "w " * (i % 9)}) for i in range(rows)]
        (root / f"part-{s:02d}.jsonl").write_text("\n".join(lines) + "\n" + ("\n" if s == 1 else ""))  # a blank line
    pq.write_table(pa.Table.from_pylist([{"text": f"pq d{i} " + "x " * (i % 5)} for i in range(parquet_rows)]),
                   root / "part-99.parquet", row_group_size=7)
    return f"file://{root}/"


def all_texts(uri):
    return sorted(row["text"] for s in list_shards(uri) for _, row in corpora.iter_rows(s))


def epoch_rows(ds, streams, world, epoch=0, state=None):
    """(rank, text) of every row the ranks' streams read in `epoch` (streams run until their epoch ends)."""
    out = []
    for r in range(world):
        st = RawStreams(ds, streams, r, world)
        for j in st.owned:
            if state is not None:
                st.seek(j, *state[j])
            while True:
                e, _, row = st.next(j)
                if e > epoch:
                    break
                if e == epoch:
                    out.append((r, row["text"]))
        st.close()
    return out


def test_one_and_two_ranks_read_every_raw_row_exactly_once_per_epoch(tmp_path):
    src = write_raw(tmp_path / "raw")
    every = all_texts(src)
    ds = open_dataset(src, "pretrain", seed=5)
    assert isinstance(ds, RawDataset) and len(every) == 4 * 30 + 45
    for world in (1, 2):
        for epoch in (0, 1):
            got = epoch_rows(ds, 8, world, epoch)
            assert sorted(t for _, t in got) == every  # all rows, none twice
    two = epoch_rows(ds, 8, 2)
    mine = [{t for r, t in two if r == rank} for rank in (0, 1)]
    assert not mine[0] & mine[1] and all(len(m) > 40 for m in mine)  # each rank reads its own share only
    assert epoch_rows(ds, 8, 2) == two  # deterministic
    # the shard order is a seeded shuffle per epoch: another epoch (or seed) reads the shards in another order
    assert sorted(ds.order(0)) == sorted(ds.order(1)) == list(range(5))
    assert len({tuple(ds.order(e)) for e in range(6)}) > 1
    assert RawDataset(src, ds.shards, "pretrain", "auto", 5).order(3) == ds.order(3)


def test_a_glob_of_parquet_shards_is_split_by_row_groups(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    for s in range(3):
        pq.write_table(pa.Table.from_pylist([{"text": f"{s}-{i}"} for i in range(20)]), root / f"p{s}.parquet",
                       row_group_size=6)
    ds = open_dataset(f"file://{root}/p*.parquet", "pretrain", seed=1)
    assert ds.units == [20, 20, 20]  # Parquet units are rows, from the footers (no scan)
    for world in (1, 2):
        got = sorted(t for _, t in epoch_rows(ds, 4, world))
        assert got == sorted(f"{s}-{i}" for s in range(3) for i in range(20))


class Counting:
    """A store backend seen through ranged reads only (as S3 is): counts the bytes each read asks for and
    fails on any whole-object read, so a test sees what streaming really reads."""

    def __init__(self, inner):
        self.inner, self.bytes, self.largest = inner, 0, 0

    def read_range(self, key, offset, length):
        self.bytes += length
        self.largest = max(self.largest, length)
        return self.inner.read_range(key, offset, length)

    def get_bytes(self, key):
        raise AssertionError(f"whole-object read of {key}")

    iter_chunks = get_bytes

    def url(self, key=""):
        return self.inner.url(key)


def test_a_rank_reads_only_its_bytes_in_bounded_ranged_reads(tmp_path, monkeypatch):
    root = tmp_path / "big"
    root.mkdir()
    for s in range(3):  # ~3 x 400 kB of JSONL
        (root / f"part-{s}.jsonl").write_text("".join(json.dumps({"text": f"{s} {i} " + "lorem " * 60}) + "\n"
                                                      for i in range(1000)))
    monkeypatch.setattr(corpora, "STREAM_BUFFER", 8 << 10)
    ds = open_dataset(f"file://{root}/", "pretrain", seed=0)
    counting = Counting(ds.shards[0].backend)
    ds.shards = [corpora.SourceShard(s.uri, s.key, s.size, counting) for s in ds.shards]
    total = sum(s.size for s in ds.shards)
    tracemalloc.start()
    st = RawStreams(ds, 4, 1, 2)  # rank 1 of 2
    n = 0
    for j in st.owned:
        while st.next(j)[0] == 0:
            n += 1
    st.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 1400 < n < 1600  # about half of the 3000 rows
    # ~half the bytes (plus a read-ahead buffer per stream and range edge), never a whole shard
    assert counting.largest <= 8 << 10 and counting.bytes < total / 2 + 4 * (16 << 10)
    assert peak < 2 << 20  # memory: buffers and a row, not the 1.2 MB of data
    # and the code path: no whole-shard read or conversion is left where raw rows are streamed
    import inspect

    src = inspect.getsource(corpora)
    assert "read_table" not in src and "_read_bytes" not in src and ".get_bytes(" not in src
    assert src.count("to_pylist()") == 1 and "batch.slice(lo, hi - lo).to_pylist()" in src


def texts_of(tokens):
    return [tuple(r) for r in tokens]


def run_pretrain(ds, L, B, steps, world, state=None):
    """Global batches (ranks' rows stacked) and the summed cursor table, as the stage checkpoints it."""
    loaders = [RawPretrainLoader(ds, L, B, r, world, lambda row: (codec.documents([row["text"]])[0], None))
               for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict({"data_streams": state})
    batches = [np.concatenate([ld.next_batch().tokens for ld in loaders]) for _ in range(steps)]
    table = sum(ld.state_dict()["data_streams"] for ld in loaders)
    return batches, table


from flashops.model.tokenizer import TokenizerCodec  # noqa: E402

codec = TokenizerCodec(skip_special_tokens=False)


def test_raw_pretraining_resumes_exactly_on_another_world_size(tmp_path, monkeypatch):
    from flashops.trainers import loader

    ds = open_dataset(write_raw(tmp_path / "raw"), "pretrain", seed=2)
    L, B, steps = 12, 4, 40  # 40 x 4 x 12 tokens: more than an epoch (~2.2k tokens), so epochs change too
    whole, _ = run_pretrain(ds, L, B, steps, 1)
    assert [b.shape for b in whole] == [(B, L + 1)] * steps
    assert all(np.array_equal(a, b) for a, b in zip(whole, run_pretrain(ds, L, B, steps, 2)[0]))
    monkeypatch.setattr(loader, "OPEN_STREAMS", 1)  # streams past the open-reader limit reopen at their position
    assert all(np.array_equal(a, b) for a, b in zip(whole, run_pretrain(ds, L, B, steps, 1)[0]))
    monkeypatch.undo()
    for before, after in ((2, 1), (1, 2), (2, 2)):
        first, state = run_pretrain(ds, L, B, 17, before)
        rest, _ = run_pretrain(ds, L, B, steps - 17, after, state)
        assert all(np.array_equal(a, b) for a, b in zip(whole, first + rest)), (before, after)
    # each row stream's rows, overlapping by one token, are its documents' tokens back to back: nothing dropped
    ld = RawPretrainLoader(ds, L, B, 0, 1, lambda row: (codec.documents([row["text"]])[0], None))
    rows = [ld.next_batch().tokens[0] for _ in range(steps)]
    stream = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
    st, docs = RawStreams(ds, B, 0, 1), []
    while sum(map(len, docs)) < len(stream):
        docs.append(codec.documents([st.next(0)[2]["text"]])[0])
    assert stream.tolist() == np.concatenate(docs)[: len(stream)].tolist()


def test_raw_sft_best_fit_per_stream_resumes_exactly_and_takes_each_conversation_once(tmp_path):
    root = tmp_path / "chat"
    root.mkdir()
    for s in range(3):
        rows = [{"messages": [{"role": "user", "content": f"s{s} q{i}" + " more" * (i % 6)},
                              {"role": "assistant", "content": f"{i}" * (1 + i % 4)}], "thinking": False}
                for i in range(25)]
        (root / f"c{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = open_dataset(f"file://{root}/", "sft", seed=4)

    def run(world, steps, state=None, packing="best-fit"):
        lds = [RawSFTLoader(ds, 63, 4, r, world, lambda row: codec.chat(row["messages"], False), packing)
               for r in range(world)]
        if state is not None:
            for ld in lds:
                ld.load_state_dict({"data_streams": state})
        out = [[ld.next_batch() for ld in lds] for _ in range(steps)]
        return out, sum(ld.state_dict()["data_streams"] for ld in lds)

    whole, _ = run(1, 12)
    first, state = run(2, 5)
    rest, _ = run(1, 7, state)
    glue = [np.concatenate([b.tokens for b in step]) for step in first + rest]
    assert all(np.array_equal(w[0].tokens, g) for w, g in zip(whole, glue))
    # an epoch: each conversation once (the stream's (epoch, position) of every placed conversation)
    placed = [s for step in whole for b in step for s in b.starts]
    epoch0 = [p for e, p in placed if e == 0]
    assert len(epoch0) == len(set(epoch0))
    eff = np.mean([b.efficiency for step in whole for b in step])
    eff_none = np.mean([b.efficiency for step in run(1, 12, packing="none")[0] for b in step])
    assert eff > eff_none  # packing several conversations per row beats one per row


def test_raw_dpo_rows_and_bad_raw_input(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "y", "rejected": "n"}) + "\n"
                                          for i in range(10)))
    ds = open_dataset(f"file://{root}/", "dpo", seed=0)
    seen = [row["prompt"] for r in (0, 1) for row in RawRowsLoader(ds, 2, r, 2).next_rows()]
    assert len(set(seen)) == 2
    with pytest.raises(DataError, match="too few rows for training.batchSize 64|holds .* rows; training.batchSize 64"):
        st = RawStreams(ds, 64)
        for j in st.owned:
            st.next(j)
    # a bad row past the rows checked when the data is opened: the stream names the shard and where
    (root / "b.jsonl").write_text('{"prompt": "p", "chosen": "y", "rejected": "n"}\n' * 150 + '{"prompt": "x"}\n')
    st = RawStreams(open_dataset(f"file://{root}/", "dpo", seed=0), 1)
    with pytest.raises(DataError, match=r"b.jsonl byte \d+: missing key\(s\) \['chosen', 'rejected'\]"):
        for _ in range(400):
            st.next(0)


@pytest.mark.slow
def test_training_on_a_raw_prefix_resumes_exactly_after_a_crash(home, tiny_run, tmp_path):
    """The stages' wiring: the row streams' cursor table goes into the checkpoint and comes back."""
    from flashops.trainers.runner import run_training

    src = write_raw(tmp_path / "raw")
    spec = {"data": {"uri": src}, "training": {"steps": 2}, "checkpoint": {"every": 1, "keep": 5}}
    whole = run_training(tiny_run("whole", "pretrain", **spec), lineage=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_run("killed", "pretrain", **spec), lineage=False, crash_after=1)
    resumed = run_training(tiny_run("killed", "pretrain", **spec), lineage=False)
    assert resumed.resumed_from == 1
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history[1:]], abs=1e-6)
    sft = run_training(tiny_run("chat", "sft", data={"uri": f"file://{write_chat(tmp_path / 'chat')}/"},
                                training={"steps": 1, "batchSize": 2, "seqLen": 64}), lineage=False)
    assert 0 < sft.history[0]["packing_efficiency"] <= 1
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    thinking_row = {"prompt": [{"role": "user", "content": "q"}], "thinking": True,  # responses as messages
                    "chosen": {"content": "5", "reasoning": "2+3=5"}, "rejected": [{"role": "assistant",
                                                                                  "content": "6", "reasoning": "2+3=5"}]}
    (pairs / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"{i}", "rejected": "no"}
                                                      if i % 2 else thinking_row) + "\n" for i in range(8)))
    dpo = run_training(tiny_run("pref", "dpo", data={"uri": f"file://{pairs}/"}, initFrom=whole.checkpoint_uri,
                                training={"steps": 1, "batchSize": 2, "seqLen": 32}), lineage=False)
    assert [r["step"] for r in dpo.history] == [1] and 0 < dpo.history[0]["loss"] < 10  # each rank: its pairs


def write_chat(root):
    root.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(12)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_two_ranks_write_one_whole_cursor_table_that_one_rank_resumes_from(tmp_path):
    """The stage's state_dict in a real 2-process group: each rank fills its streams, an all-reduce joins them."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    src = write_raw(tmp_path / "raw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("_raw_cursor_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, src, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert np.array_equal(got[0]["table"], got[1]["table"])  # the same table on both ranks (DCP saves rank 0's)
    ds = open_dataset(src, "pretrain", seed=2)
    whole, table = run_pretrain(ds, 12, 4, 6, 1)
    assert np.array_equal(got[0]["table"], run_pretrain(ds, 12, 4, 3, 1)[1])
    assert all(np.array_equal(np.concatenate([got[0]["rows"][k], got[1]["rows"][k]]), whole[k]) for k in range(3))
    rest, _ = run_pretrain(ds, 12, 4, 3, 1, got[0]["table"])  # one rank goes on from the 2-rank table
    assert all(np.array_equal(a, b) for a, b in zip(rest, whole[3:]))
