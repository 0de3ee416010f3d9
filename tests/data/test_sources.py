"""A converter reads the file the user named, never another one beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data.convert.sources import Source
from recsys.data.schema import DataError


def test_a_named_file_is_the_only_candidate(tmp_path: Path) -> None:
    for name in ("u.data", "ratings.csv", "u.item"):
        (tmp_path / name).write_text("1\t2\t3\t4\n")
    named = Source(tmp_path / "ratings.csv")
    assert named.find("u.data") is None  # the neighbour is not read in its place
    assert named.find("ratings.csv") == "ratings.csv"
    assert Source(tmp_path / "u.data").sibling("u.data", "u.item") == "u.item"
    assert Source(tmp_path).find("u.data") == "u.data"  # a directory: any of its files


def test_a_named_file_of_another_name_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "Books.json").write_text("{}\n")
    (tmp_path / "my_reviews.txt").write_text("{}\n")
    source = Source(tmp_path / "my_reviews.txt")
    with pytest.raises(DataError, match=r"my_reviews.txt: its name is not one a reviews file"):
        source.require(source.find("*.json", "*.json.gz"), "reviews file")
