"""Streaming reads every row exactly once per epoch across ranks × workers, batches hold the
right values, and a restarted stream continues exactly where it stopped."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from recsys.data.batch import hash_ids
from recsys.data.files import open_dataset
from recsys.data.protocol import write_split
from recsys.data.shuffled import ShuffledReader
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.data.synth import SynthConfig, make

# SplitMix64's finaliser (z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
# z *= 0x94D049BB133111EB; z ^= z >> 31) of 0, 1, 2 and 2**64 - 1, modulo 2**20.
PINNED_HASHES = [0, 722405, 726154, 769403]


def read_rows(directory: Path) -> pa.Table:
    """Every row of a dataset in file order, so that row id = table row."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(directory.glob("*.parquet")))


def loader(stream: ParquetStream, workers: int) -> StatefulDataLoader:
    return StatefulDataLoader(stream, batch_size=None, num_workers=workers)


def row_ids(batches) -> list[int]:
    return [i for b in batches for i in b.row_ids.tolist()]


def test_exactly_once_across_two_ranks_and_two_workers(synth_dir: Path) -> None:
    source = synth_dir / "ctr_train"
    total = open_dataset(str(source)).rows
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = ParquetStream(
                str(source), StreamConfig(batch_size=16), rank=rank, world_size=2
            )
            stream.set_epoch(epoch)
            seen += row_ids(loader(stream, 2))
        assert len(seen) == total
        assert sorted(seen) == list(range(total))


def test_each_epoch_has_its_own_order_and_seeds_repeat(synth_dir: Path) -> None:
    def order(epoch: int, seed: int) -> list[int]:
        stream = ParquetStream(str(synth_dir / "seq"), StreamConfig(batch_size=32, seed=seed))
        stream.set_epoch(epoch)
        return row_ids(stream)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    stream = ParquetStream(str(synth_dir / "seq"), StreamConfig(batch_size=32, shuffle=False))
    assert row_ids(stream) == list(range(stream.dataset.rows))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_at_any_batch_continues_exactly(synth_dir: Path, workers: int, epoch: int) -> None:
    source = str(synth_dir / "ctr_train")
    config = StreamConfig(batch_size=40, buffer_row_groups=2)

    def fresh() -> tuple[ParquetStream, StatefulDataLoader]:
        stream = ParquetStream(source, config)
        stream.set_epoch(epoch)
        return stream, loader(stream, workers)

    full = [b.row_ids.tolist() for b in fresh()[1]]
    total = open_dataset(source).rows
    assert sorted(i for b in full for i in b) == list(range(total))
    # Stop after every batch, including after some workers have finished their share.
    for stop in range(len(full) + 1):
        _, first = fresh()
        it = iter(first)
        head = [next(it).row_ids.tolist() for _ in range(stop)]
        state = first.state_dict()
        del it, first  # the job dies here
        _, resumed = fresh()
        resumed.load_state_dict(state)
        tail = [b.row_ids.tolist() for b in resumed]
        assert head + tail == full, f"stopped after {stop} batches"


def test_next_pass_reads_the_next_epoch(synth_dir: Path) -> None:
    stream = ParquetStream(str(synth_dir / "seq"), StreamConfig(batch_size=32))
    first = row_ids(stream)
    end_of_epoch = stream.state_dict()
    second = row_ids(stream)
    assert sorted(first) == sorted(second) and first != second
    assert stream.epoch == 1
    resumed = ParquetStream(str(synth_dir / "seq"), StreamConfig(batch_size=32))
    resumed.load_state_dict(end_of_epoch)
    assert row_ids(resumed) == []  # epoch 0 was finished
    assert sorted(row_ids(resumed)) == sorted(first)  # then epoch 1


def test_cursor_of_other_settings_is_refused(synth_dir: Path) -> None:
    source = str(synth_dir / "ctr_train")
    stream = ParquetStream(source, StreamConfig(batch_size=10, seed=1))
    next(iter(stream))
    other = ParquetStream(source, StreamConfig(batch_size=10, seed=2))
    other.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match=r"other stream settings or files .*'seed': \(1, 2\)"):
        next(iter(other))


def test_fewer_row_groups_than_readers_still_feeds_every_reader(tmp_path: Path) -> None:
    result, source = make(SynthConfig(users=60, items=40, categories=4, seed=5))
    write_split(tmp_path / "d", result, source)  # one row group per dataset
    directory = str(tmp_path / "d" / "ctr_train")
    total = open_dataset(directory).rows
    seen, per_rank = [], []
    for rank in (0, 1):
        stream = ParquetStream(directory, StreamConfig(batch_size=8), rank=rank, world_size=2)
        ids = row_ids(loader(stream, 2))
        per_rank.append(len(ids))
        seen += ids
    assert sorted(seen) == list(range(total))
    assert min(per_rank) > 0


def test_cursor_of_another_layout_is_refused(synth_dir: Path) -> None:
    source = str(synth_dir / "ctr_train")
    stream = ParquetStream(source, StreamConfig(batch_size=10))
    it = iter(stream)
    next(it)
    state = stream.state_dict()
    other = ParquetStream(source, StreamConfig(batch_size=10), rank=1, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="belongs to reader 0 of 1 but this is reader 1 of 2"):
        next(iter(other))


@pytest.mark.parametrize(
    "shuffle, native",
    [(True, True), (True, False), (False, True)],
    ids=["shuffled", "shuffled-numpy", "file-order"],  # rows scattered, or runs as views
)
def test_batches_hold_the_rows_they_name(
    synth_dir: Path, shuffle: bool, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsys.data.segments as segments

    if not native:
        monkeypatch.setattr(segments, "_LIBRARY", None)
    source = synth_dir / "ctr_train"
    records = read_rows(source).to_pylist()
    # Batches of 25 over row groups of 23 rows: most batches join two shuffle buffers.
    stream = ParquetStream(str(source), StreamConfig(batch_size=25, max_len=6, shuffle=shuffle))
    seen = []
    for batch in stream:
        features = batch.features
        lengths = features["history_item"].lengths().tolist()
        items = features["history_item"].to_dense()
        categories = features["history_category"].to_dense()
        for k, row in enumerate(batch.row_ids.tolist()):
            record = records[row]
            assert lengths[k] == min(6, len(record["history_item_ids"]))
            # The most recent events are kept.
            assert items[k].tolist() == record["history_item_ids"][-6:]
            assert categories[k].tolist() == record["history_category_ids"][-6:]
            assert features["candidate_item"].to_dense()[k].tolist() == [record["item_id"]]
            assert features["candidate_category"].to_dense()[k].tolist() == [record["category_id"]]
            assert batch.labels[k].item() == record["label"]
            assert batch.user_ids[k].item() == record["user_id"]
            assert batch.timestamps[k].item() == record["timestamp"]
        seen += batch.row_ids.tolist()
    assert sorted(seen) == list(range(len(records)))


def test_seq_batches(synth_dir: Path) -> None:
    stream = ParquetStream(str(synth_dir / "seq"), StreamConfig(batch_size=8, max_len=None))
    batch = next(iter(stream))
    assert batch.features.keys() == ["item", "category"]
    assert batch.labels is None
    table = read_rows(synth_dir / "seq")
    first = table.slice(batch.row_ids[0].item(), 1).to_pylist()[0]
    assert batch.features["item"].to_dense()[0].tolist() == first["item_ids"]


def test_hash_mode_maps_raw_ids_into_the_table(synth_dir: Path) -> None:
    dataset = open_dataset(str(synth_dir / "ctr_train"))
    meta = dataset.meta
    meta.id_mode = "hash"
    meta.vocab = {**meta.vocab, "item": 7}
    stream = ParquetStream(
        str(synth_dir / "ctr_train"), StreamConfig(batch_size=50, shuffle=False), meta=meta
    )
    batch = next(iter(stream))
    values = batch.features["history_item"].values().numpy()
    assert values.min() >= 0 and values.max() < 7
    table = read_rows(synth_dir / "ctr_train").slice(0, 50)
    raw = np.concatenate(
        [np.array(r[-200:], dtype=np.int64) for r in table.column("history_item_ids").to_pylist()]
    )
    assert values.tolist() == hash_ids(raw, 7).tolist()
    # Stable and spread: nearby raw ids land in different rows.
    assert (
        hash_ids(np.array([1, 2, 3, 4]), 1 << 20).tolist()
        == hash_ids(np.array([1, 2, 3, 4]), 1 << 20).tolist()
    )
    assert len(set(hash_ids(np.arange(1000), 1 << 20).tolist())) > 990


def test_batches_cross_processes_intact(synth_dir: Path) -> None:
    batch = next(iter(ParquetStream(str(synth_dir / "ctr_train"), StreamConfig(batch_size=9))))
    copy = pickle.loads(pickle.dumps(batch))  # what a loader worker sends
    assert copy.features.keys() == batch.features.keys()
    assert torch.equal(copy.features.values(), batch.features.values())
    assert torch.equal(copy.features.lengths(), batch.features.lengths())
    for name in ("user_ids", "row_ids", "labels", "timestamps"):
        assert torch.equal(getattr(copy, name), getattr(batch, name)), name
    assert copy.labels.dtype == torch.float32


@pytest.mark.parametrize(
    "shuffle, batch_size",
    [(True, 40), (False, 40), (False, 23)],
    ids=["shuffled", "file-order", "file-order-one-run"],  # 23: a batch is one row group
)
def test_ids_are_int32_when_every_table_fits_and_int64_otherwise(
    synth_dir: Path, shuffle: bool, batch_size: int
) -> None:
    source = str(synth_dir / "ctr_train")
    config = StreamConfig(batch_size=batch_size, shuffle=shuffle)
    narrow = list(ParquetStream(source, config))
    meta = open_dataset(source).meta
    meta.vocab = {**meta.vocab, "category": 2**31 + 1}  # one table past int32's reach
    wide = list(ParquetStream(source, config, meta=meta))
    assert {b.features.values().dtype for b in narrow} == {torch.int32}
    assert {b.features.values().dtype for b in wide} == {torch.int64}
    for a, b in zip(narrow, wide, strict=True):
        assert a.features.values().tolist() == b.features.values().tolist()
        copy = pickle.loads(pickle.dumps(a))  # a loader worker's batch keeps its type
        assert copy.features.values().dtype == torch.int32
        assert torch.equal(copy.features.values(), a.features.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_count_is_known_from_the_footers(synth_dir: Path, workers: int) -> None:
    for rank in (0, 1):
        stream = ParquetStream(
            str(synth_dir / "ctr_train"), StreamConfig(batch_size=7), rank=rank, world_size=2
        )
        stream.set_epoch(3)
        expected = stream.batches_in_epoch(3, workers)
        assert len(list(loader(stream, workers))) == expected


def test_batches_with_ids_beyond_int32_cross_processes_intact() -> None:
    from torchrec import KeyedJaggedTensor

    from recsys.data.batch import Batch

    values = torch.tensor([5, 2**31, 2**40 + 3, 7])  # ids of a hashed 2^41-row table
    features = KeyedJaggedTensor(keys=["item"], values=values, lengths=torch.tensor([3, 1]))
    batch = Batch(features, torch.tensor([10, 11]), torch.tensor([0, 1]))
    copy = pickle.loads(pickle.dumps(batch))
    assert copy.features.values().dtype == torch.int64
    assert copy.features.values().tolist() == values.tolist()
    assert copy.labels is None


@pytest.mark.parametrize("shuffle", [True, False])
def test_decoding_in_small_chunks_changes_nothing(
    synth_dir: Path, shuffle: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row groups are decoded in chunks (runs of a chunk in file order; shuffled, each
    chunk's rows scattered to their batches): batches that span chunks and row groups, cut lists and
    a resumed pass are the same whatever the chunk size."""
    import recsys.data.file_order as file_order
    import recsys.data.shuffled as shuffled

    source = str(synth_dir / "ctr_train")
    config = StreamConfig(batch_size=10, max_len=6, shuffle=shuffle, buffer_row_groups=2)

    def batches(state=None) -> list[tuple[list[int], ...]]:
        stream = ParquetStream(source, config)
        if state is not None:
            stream.load_state_dict(state)
        out = []
        for b in stream:
            f = b.features
            out.append(
                (b.row_ids.tolist(), f.values().tolist(), f.lengths().tolist(), b.labels.tolist())
            )
        return out

    whole = batches()  # row groups of 23 rows: each decoded in one chunk
    monkeypatch.setattr(file_order, "IN_ORDER_ROWS", 4)  # 10-row chunks in file order
    monkeypatch.setattr(shuffled, "SHUFFLE_CHUNK_ROWS", 7)
    assert batches() == whole
    stream = ParquetStream(source, config)
    it = iter(stream)
    for _ in range(5):
        next(it)
    assert batches(stream.state_dict()) == whole[5:]


def test_item_lists_decoded_in_a_pass_of_their_own_change_nothing(
    synth_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shuffled, a buffer's other columns are decoded first and its item lists then, one chunk
    at a time: the batches are those of one pass over every column, across buffers (a batch
    carried into the next), cut lists, ranks and a resume inside a buffer."""
    source = str(synth_dir / "ctr_train")
    config = StreamConfig(batch_size=10, max_len=6, buffer_row_groups=2)
    passes = []
    two_passes = ShuffledReader._two_passes

    def counted(self, *args):
        passes.append(1)
        return two_passes(self, *args)

    monkeypatch.setattr(ShuffledReader, "_two_passes", counted)

    def batches(one_pass: bool, rank: int = 0, state=None) -> list[tuple[list[int], ...]]:
        stream = ParquetStream(source, config, rank=rank, world_size=2)
        if one_pass:
            stream._reader.late = None
        if state is not None:
            stream.load_state_dict(state)
        return [
            (b.row_ids.tolist(), b.features.values().tolist(), b.features.lengths().tolist())
            for b in stream
        ]

    for rank in (0, 1):
        whole = batches(one_pass=True, rank=rank)
        assert not passes
        assert batches(one_pass=False, rank=rank) == whole
        assert passes
        stream = ParquetStream(source, config, rank=rank, world_size=2)
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert batches(False, rank, stream.state_dict()) == whole[3:]
        passes.clear()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_gets_the_same_number_of_batches_and_no_row_is_left_out(
    synth_dir: Path, shuffle: bool, drop_last: bool
) -> None:
    # 422 rows in row groups of 23 over 2 ranks × 2 workers (4 readers): with batch 40 the
    # last step has rows for every reader; with batch 35 it has fewer (422 = 4 × 3 × 35 + 2),
    # which two readers' last batches take in (36 rows) rather than a step others would skip.
    source = str(synth_dir / "ctr_train")
    total = open_dataset(source).rows
    for batch_size in (40, 35, 1000):
        counts, seen, sizes = [], [], []
        for rank in (0, 1):
            config = StreamConfig(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
            stream = ParquetStream(source, config, rank=rank, world_size=2)
            batches = list(loader(stream, 2))
            counts.append(len(batches))
            assert len(batches) == stream.batches_in_epoch(0, 2)
            seen += row_ids(batches)
            sizes += [len(b) for b in batches]
        assert counts[0] == counts[1], (batch_size, counts)
        assert len(set(seen)) == len(seen)
        if drop_last:
            assert set(sizes) == {batch_size} or not sizes
        else:
            assert sorted(seen) == list(range(total)), batch_size
            assert max(sizes) == min(batch_size + (batch_size == 35), 106)
