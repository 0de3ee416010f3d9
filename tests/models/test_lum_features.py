"""LUM's step-2 features on disk and as a ranker's inputs: direct outputs, interest matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.schema import DataError
from recsys.models import lum_features
from recsys.models.lum_features import UserFeatures

OUTPUTS = np.array(  # 3 users × N = 2 queries × d = 2
    [[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]],
    dtype=np.float32,
)
ITEMS = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)


def _written(tmp_path: Path) -> Path:
    # Users 0 and 1 on rank 0, user 3 on rank 1; user 2 never queried.
    lum_features.write_users(tmp_path, 0, np.array([0, 1]), OUTPUTS[:2])
    lum_features.write_users(tmp_path, 1, np.array([3]), OUTPUTS[2:] + 1)
    lum_features.write_items(tmp_path, ITEMS)
    lum_features.write_meta(tmp_path, {"queries": 2, "dim": 2, "users": 5, "parts": 2})
    return tmp_path


def test_direct_and_matching_features(tmp_path: Path) -> None:
    features = UserFeatures.load(_written(tmp_path))
    assert features.width == 2 * 2 + 2
    users, candidates = torch.tensor([1, 0, 2, 9]), torch.tensor([1, 2, 0, 0])
    got = features(users, candidates).numpy()
    np.testing.assert_allclose(got[0, :4], OUTPUTS[1].ravel())
    # Cosines of user 1's outputs (3, 4) and (1, 1) with item 1 (0, 1).
    np.testing.assert_allclose(got[0, 4:], [0.8, 1 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(got[1, 4:], [1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-6)
    # Never queried (2) and outside the table (9): zeros.
    np.testing.assert_array_equal(got[2:], 0.0)
    assert features.missing(users) == 2
    only = UserFeatures.load(tmp_path, direct=False)
    np.testing.assert_allclose(only(users, candidates).numpy(), got[:, 4:])


def test_parts_named_by_the_metadata_must_exist(tmp_path: Path) -> None:
    directory = _written(tmp_path)
    (directory / "users" / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match="parts that are missing"):
        UserFeatures.load(directory)


def test_a_directory_that_is_not_features_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a lum_query stage's features"):
        UserFeatures.load(tmp_path)
