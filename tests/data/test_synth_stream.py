"""The streamed synthetic generator: blocks independent of how many users follow, the GPSD
split rules kept without holding the log, hash mode readable by the stream, chunked
vocabularies identical to whole ones, memory that does not grow with users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.cli import main as cli
from recsys.data import synth_stream
from recsys.data.batch import hash_ids
from recsys.data.protocol import ProtocolConfig
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.data.synth import SynthConfig
from recsys.data.synth_stream import Catalogue, StreamSynthConfig, splitmix, unsplitmix, write
from recsys.data.vocab import Vocabulary, write_range
from recsys.data.writer import PartWriter, atomic_directory


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 users, so that small logs span many blocks."""
    monkeypatch.setattr(synth_stream, "BLOCK_USERS", 64)


def world(**kw) -> SynthConfig:
    defaults = dict(users=300, items=1_000, categories=10, min_events=4, max_events=12, seed=5)
    return SynthConfig(**{**defaults, **kw})


def read(path: Path) -> dict:
    """A dataset's rows (its part files in order), as Python lists by column."""
    return pq.read_table(sorted(path.glob("part-*.parquet"))).to_pydict()


def test_users_do_not_depend_on_the_users_after_them(tmp_path: Path) -> None:
    write(tmp_path / "a", StreamSynthConfig(world(users=150)))
    write(tmp_path / "b", StreamSynthConfig(world(users=400)))
    a, b = read(tmp_path / "a" / "seq"), read(tmp_path / "b" / "seq")
    assert len(a["user_id"]) == 150 and len(b["user_id"]) == 400
    for column in ("user_id", "item_ids", "category_ids", "timestamps"):
        assert a[column] == b[column][:150], column
    negatives = [
        np.concatenate([b.negative for b in synth_stream.events(world(users=n))])
        for n in (150, 400)
    ]
    assert (negatives[0] == negatives[1][:150]).all()
    # ... and the seed decides: another seed, another log.
    write(tmp_path / "c", StreamSynthConfig(world(users=150, seed=6)))
    assert read(tmp_path / "c" / "seq")["item_ids"] != a["item_ids"]


def test_split_follows_the_protocol(tmp_path: Path) -> None:
    config = world(users=500)
    write(tmp_path / "d", StreamSynthConfig(config), ProtocolConfig(max_history=5))
    items, clusters, times = [], [], []
    for b in synth_stream.events(config):
        for start, n in zip(b.starts.tolist(), b.lengths.tolist(), strict=True):
            items.append(b.item[start : start + n].tolist())
            clusters.append(b.cluster[start : start + n].tolist())
            times.append(b.timestamp[start : start + n].tolist())
    assert len(items) == 500 and all(t == sorted(t) for t in times)
    seq = read(tmp_path / "d" / "seq")
    assert seq["user_id"] == list(range(500))
    assert seq["item_ids"] == [i[:-1] for i in items]  # every event but the last
    assert seq["category_ids"] == [c[:-1] for c in clusters]
    last = np.array([t[-1] for t in times])
    threshold = np.sort(last)[int(0.7 * 500)]
    item_vocab = Vocabulary.read(tmp_path / "d" / "vocab" / "item.parquet", "item")
    seen = {}
    for split in ("ctr_train", "ctr_test"):
        ctr = read(tmp_path / "d" / split)
        for row in range(0, len(ctr["user_id"]), 2):
            user = ctr["user_id"][row]
            assert ctr["user_id"][row + 1] == user and ctr["label"][row : row + 2] == [1, 0]
            seen[user] = split
            positive, negative = ctr["item_id"][row], ctr["item_id"][row + 1]
            assert positive == items[user][-1] and ctr["timestamp"][row] == times[user][-1]
            assert negative != positive and 0 <= negative < 1_000
            for r in (row, row + 1):
                assert ctr["history_item_ids"][r] == items[user][-6:-1]  # max_history 5
                assert ctr["category_id"][r] == item_vocab.side["category"][ctr["item_id"][r]]
    assert sorted(seen) == list(range(500))
    test = {u for u, split in seen.items() if split == "ctr_test"}
    assert test == set(np.flatnonzero(last > threshold).tolist())
    assert len(test) == pytest.approx(150, abs=5)  # the latest ~30%
    meta = json.loads((tmp_path / "d" / "ctr_test" / "dataset.json").read_text())
    assert meta["rows"] == 2 * len(test) and sum(meta["files"].values()) == meta["rows"]
    assert meta["vocab"] == {"item": 1_002, "category": 12, "user": 500}
    assert meta["vocabularies"]["item"]["keys"] == 1_000  # the whole catalogue, touched or not


@pytest.mark.parametrize("fraction", [0.15, 0.5])
def test_validation_users_are_the_latest_training_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    # Few distinct times (short gaps, a narrow start) so that ties at the boundaries abound.
    monkeypatch.setattr(synth_stream, "MAX_START", 40)
    monkeypatch.setattr(synth_stream, "MAX_GAP", 3)
    config = world(users=700, min_events=2, max_events=3, seed=int(100 * fraction))
    synth_stream_times = np.concatenate([b.last_time for b in synth_stream.events(config)])
    protocol = ProtocolConfig(min_events=2, valid_users=fraction)
    write(tmp_path / "v", StreamSynthConfig(config), protocol)
    threshold = np.sort(synth_stream_times)[int(0.7 * 700)]
    train = np.flatnonzero(synth_stream_times <= threshold)
    by_time = train[np.lexsort((train, synth_stream_times[train]))]  # protocol.split's rule
    n_valid = max(1, round(fraction * len(train)))
    boundary = synth_stream_times[by_time[-n_valid]]
    assert (synth_stream_times[by_time[:-n_valid]] == boundary).any()  # a tie is split

    def users(name: str) -> list[int]:
        return sorted(set(read(tmp_path / "v" / name)["user_id"]))

    assert users("ctr_valid") == sorted(by_time[-n_valid:].tolist())
    assert users("ctr_fit") == sorted(by_time[:-n_valid].tolist())
    assert users("ctr_train") == train.tolist()
    meta = json.loads((tmp_path / "v" / "ctr_valid" / "dataset.json").read_text())
    assert meta["protocol"]["counts"]["valid_users"] == n_valid
    assert meta["protocol"]["counts"]["ctr_valid_samples"] == meta["rows"] == 2 * n_valid


def test_hash_mode_writes_raw_keys_the_stream_reads(tmp_path: Path) -> None:
    config = world(users=200)
    write(tmp_path / "remap", StreamSynthConfig(config))
    write(tmp_path / "hash", StreamSynthConfig(config, hash_ids=True, table_rows=300))
    meta = json.loads((tmp_path / "hash" / "ctr_train" / "dataset.json").read_text())
    assert meta["id_mode"] == "hash" and meta["vocab"]["item"] == 300
    assert "vocabularies" not in meta and not (tmp_path / "hash" / "vocab").exists()
    remap, hashed = read(tmp_path / "remap" / "ctr_train"), read(tmp_path / "hash" / "ctr_train")
    # The same log: item keys are a bijection of the dense ids; categories hash onto theirs.
    assert hashed["item_id"] == splitmix(np.array(remap["item_id"])).tolist()
    assert hash_ids(np.array(hashed["category_id"]), 12).tolist() == remap["category_id"]
    stream = ParquetStream(
        str(tmp_path / "hash" / "ctr_train"), StreamConfig(batch_size=16), rank=0, world_size=1
    )
    batch = next(iter(stream))
    for key, rows in (("history_item", 300), ("candidate_item", 300), ("candidate_category", 12)):
        ids = batch.features[key].values()
        assert ids.numel() > 0 and int(ids.min()) >= 0 and int(ids.max()) < rows, key
    assert len(batch.labels) == 16


def test_scrambles_are_bijections() -> None:
    keys = np.array([0, 1, 2, -1, 2**62, -(2**63)], dtype=np.int64)
    assert (unsplitmix(splitmix(keys)) == keys).all() and (splitmix(unsplitmix(keys)) == keys).all()
    for items, categories in ((1_000, 10), (1_024, 4), (999, 3)):
        catalogue = Catalogue(world(items=items, categories=categories))
        index = np.arange(items)
        cluster = index // catalogue.per_cluster
        position = (synth_stream._mul_mod(index, catalogue.a, items) + catalogue.b) % items
        assert sorted(position.tolist()) == list(range(items))
        assert (catalogue.cluster(position) == cluster).all()
        drawn = catalogue.draw(np.random.default_rng(0), cluster)
        assert (catalogue.cluster(drawn) == cluster).all()
    # Large catalogues: no int64 overflow in the modular products.
    n = 2**32 - 5
    x = np.array([n - 1, n - 2, 12345], dtype=np.int64)
    assert synth_stream._mul_mod(x, n - 3, n).tolist() == [v * (n - 3) % n for v in x.tolist()]


def test_zipf_popularity_has_a_long_tail() -> None:
    counts = np.zeros(20_000, dtype=np.int64)
    for b in synth_stream.events(world(users=2_000, items=20_000, zipf=1.0)):
        counts += np.bincount(b.item, minlength=len(counts))
    ordered = np.sort(counts)[::-1]
    assert ordered[0] > 50 * max(1, ordered[1_000])  # a head ...
    assert 3_000 < (counts > 0).sum() < 20_000  # ... and a long tail, not all touched


@pytest.mark.parametrize("chunk", [3, 4, 1 << 20])
def test_chunked_vocabulary_is_the_whole_one(tmp_path: Path, chunk: int) -> None:
    category = np.array([2, 0, 1, 1, 0, 2, 2], dtype=np.int64)
    whole = Vocabulary(
        "item", np.arange(7, dtype=np.int64), {"category": category}, side_sizes={"category": 3}
    )
    write_range(
        tmp_path / "item.parquet",
        "item",
        7,
        side={"category": lambda ids: category[ids]},
        side_sizes={"category": 3},
        chunk=chunk,
    )
    assert pq.read_table(tmp_path / "item.parquet").equals(whole.to_table())
    write_range(tmp_path / "user.parquet", "user", 5, chunk=chunk)
    users = Vocabulary.read(tmp_path / "user.parquet", "user")
    assert users.size == 5 and users.keys.to_pylist() == [0, 1, 2, 3, 4]


def test_buffered_parts_get_full_row_groups(tmp_path: Path) -> None:
    from recsys.data.schema import DatasetMeta

    meta = DatasetMeta(kind="seq", vocab={"item": 10})
    table = pq.read_table(_tiny_seq(tmp_path))
    with atomic_directory(tmp_path / "out") as tmp:
        parts = PartWriter(tmp, meta, row_group_rows=5, rows_per_file=12, buffer=True)
        for _ in range(9):
            parts.write(table)  # 3 rows at a time
        written = parts.close()
    assert written.rows == 27 and written.files == {
        "part-00000.parquet": 12,
        "part-00001.parquet": 12,
        "part-00002.parquet": 3,
    }
    groups = pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [5, 5, 2]


def _tiny_seq(tmp_path: Path) -> Path:
    import pyarrow as pa

    path = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"user_id": [0, 1, 2], "item_ids": [[1], [2, 3], []]}), path)
    return path


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x")
    assert cli(["data", "synth", "--table-rows", "10", "--out", out]) == 2
    assert "--hash-ids" in capsys.readouterr().err
    assert cli(["data", "synth", "--stream", "--dense-train", "--out", out]) == 2
    assert "--dense-train" in capsys.readouterr().err
    assert cli(["data", "synth", "--stream", "--users", "1", "--out", out]) == 2
    assert "ctr_test would have 0 rows" in capsys.readouterr().err
    assert not Path(out).exists()


MEASURE = """
import resource, sys
from recsys.data import synth_stream
from recsys.data.synth import SynthConfig
config = SynthConfig(users=int(sys.argv[1]), items=200_000, categories=20, max_events=40)
synth_stream.write(sys.argv[2], synth_stream.StreamSynthConfig(config), row_group_rows=2048)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_users(tmp_path: Path) -> None:
    def peak_kib(users: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(users), str(tmp_path / str(users))],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.split()[-1])

    small, large = peak_kib(4_000), peak_kib(60_000)  # 15x the users: ~1.3M events
    # Holding the log would add >= 1.3M events x 4 int64 arrays (40 MiB) and its tables.
    assert large - small < 16 * 1024, (small, large)


def test_a_failure_mid_stream_leaves_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    write(out, StreamSynthConfig(world(users=100)))
    before = read(out / "seq")
    real, calls = synth_stream._seq, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two blocks written, the third fails
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_stream, "_seq", failing)
    with pytest.raises(OSError, match="disk full"):
        write(out, StreamSynthConfig(world(users=300)), overwrite=True)
    assert read(out / "seq") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries
