"""The stream's batches, bit for bit, pinned by digest: the order of rows, every tensor of
every batch and the cursor after each one, for shuffled and file-order reading, loader
workers, two ranks, resumes, two epochs, ``drop_last`` and skipped bad row groups.

A digest changes when any batch or cursor does. Reading the same rows another way must
leave every digest as it is; a change of the row order itself is a change of behaviour
(resumed jobs would read other rows) and updates these digests on purpose."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from test_bad_input import dataset_with_a_bad_row_group
from torchdata.stateful_dataloader import StatefulDataLoader

from recsys.data.batch import Batch
from recsys.data.stream import ParquetStream, StreamConfig


def digest_batch(batch: Batch, into: hashlib._Hash) -> None:
    """Every tensor of ``batch``: keys, dtypes, shapes and bytes."""
    features = batch.features
    into.update(repr(features.keys()).encode())
    tensors = {"values": features.values(), "lengths": features.lengths()}
    for name in ("user_ids", "row_ids", "labels", "timestamps"):
        tensors[name] = getattr(batch, name)
    for name, tensor in tensors.items():
        if tensor is None:
            into.update(f"{name}: none".encode())
            continue
        into.update(f"{name}: {tensor.dtype} {tuple(tensor.shape)}".encode())
        into.update(tensor.contiguous().numpy().tobytes())


def digest(batches: Iterable[Batch], stream: ParquetStream | None = None) -> str:
    """The digest of ``batches``; with ``stream`` (read without workers), of its cursor
    after each batch and at the end too."""
    into = hashlib.sha256()
    for batch in batches:
        digest_batch(batch, into)
        if stream is not None:
            into.update(repr(sorted(stream.state_dict().items())).encode())
    if stream is not None:
        into.update(repr(sorted(stream.state_dict().items())).encode())
    return into.hexdigest()[:16]


def epochs(source: Path, config: StreamConfig, rank: int = 0, world: int = 1) -> str:
    """Two epochs of one rank read by the stream itself, cursors included."""
    stream = ParquetStream(str(source), config, rank=rank, world_size=world)
    return digest([*stream, *stream], stream)


def loaded(source: Path, config: StreamConfig, workers: int, rank: int, world: int) -> str:
    """Epoch 1 of one rank through a loader with ``workers`` workers."""
    stream = ParquetStream(str(source), config, rank=rank, world_size=world)
    stream.set_epoch(1)
    return digest(StatefulDataLoader(stream, batch_size=None, num_workers=workers))


def resumed(
    source: Path, config: StreamConfig, workers: int = 0, stops: Iterable[int] | None = None
) -> str:
    """For each stop (None: after every batch and before the first), the batches read after
    a restart that loaded the cursor saved after ``stop`` batches (of the stream itself or of
    a loader with ``workers`` workers)."""
    if stops is None:
        stops = range(len(list(ParquetStream(str(source), config))) + 1)
    parts = []
    for stop in stops:
        first = ParquetStream(str(source), config)
        second = ParquetStream(str(source), config)
        if workers:
            before = StatefulDataLoader(first, batch_size=None, num_workers=workers)
            after = StatefulDataLoader(second, batch_size=None, num_workers=workers)
        else:
            before, after = first, second
        it = iter(before)
        for _ in range(stop):
            next(it)
        after.load_state_dict(before.state_dict())
        del it
        parts.append(digest(after, None if workers else second))
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]


CONFIGS = {
    "shuffled": StreamConfig(batch_size=10, max_len=6),
    "shuffled-buffers-of-2": StreamConfig(batch_size=40, buffer_row_groups=2),
    "shuffled-drop-last": StreamConfig(batch_size=35, buffer_row_groups=2, drop_last=True),
    "file-order": StreamConfig(batch_size=10, max_len=6, shuffle=False),
    "file-order-buffers-of-2": StreamConfig(batch_size=40, shuffle=False, buffer_row_groups=2),
    "file-order-drop-last": StreamConfig(batch_size=35, shuffle=False, drop_last=True),
}
"""Batches of 10 and 40 over row groups of 23 rows span row groups and shuffle buffers; 422
rows in batches of 35 over 4 readers leave a last step too small for every reader."""

RANKS = ((0, 1), (0, 2), (1, 2))
"""(rank, world size): one rank alone, and both ranks of two."""


@pytest.fixture(scope="module")
def sources(synth_dir: Path, synth_split, tmp_path_factory: pytest.TempPathFactory):
    """ctr and seq datasets of 300 users; a seq dataset with condition lists; a ctr dataset
    of 12 rows whose row group 1 of b.parquet (rows 6 and 7) holds a bad id."""
    tmp = tmp_path_factory.mktemp("pinned")
    conditions = synth_split(
        tmp / "conditions", 16, users=60, items=40, categories=4, max_events=12, conditions=3
    )
    return {
        "ctr": synth_dir / "ctr_train",
        "seq": synth_dir / "seq",
        "conditions": conditions / "seq",
        "bad": dataset_with_a_bad_row_group(tmp),
    }


def cases() -> dict[str, tuple[str, Callable[[Path], str]]]:
    """Each case's dataset and digest."""
    out: dict[str, tuple[str, Callable[[Path], str]]] = {}
    for name, config in CONFIGS.items():
        for rank, world in RANKS:
            out[f"{name}-rank-{rank}-of-{world}"] = (
                "ctr",
                lambda s, c=config, r=rank, w=world: epochs(s, c, r, w),
            )
    for shuffle in (True, False):
        order = "shuffled" if shuffle else "file-order"
        config = StreamConfig(batch_size=35, shuffle=shuffle)
        for workers in (0, 1, 2):
            for rank, world in RANKS:
                out[f"{order}-{workers}-workers-rank-{rank}-of-{world}"] = (
                    "ctr",
                    lambda s, c=config, k=workers, r=rank, w=world: loaded(s, c, k, r, w),
                )
        config = StreamConfig(batch_size=40, shuffle=shuffle, buffer_row_groups=2)
        out[f"{order}-resumed-after-every-batch"] = (
            "ctr",
            lambda s, c=config: resumed(s, c),
        )
        out[f"{order}-resumed-through-2-workers"] = (
            "ctr",
            lambda s, c=config: resumed(s, c, 2, (0, 3, 6, 12)),
        )
        seq = StreamConfig(batch_size=16, shuffle=shuffle, max_len=None)
        out[f"{order}-seq"] = ("seq", lambda s, c=seq: epochs(s, c))
        conditions = StreamConfig(batch_size=8, shuffle=shuffle, conditions=True)
        out[f"{order}-conditions"] = ("conditions", lambda s, c=conditions: epochs(s, c))
        for batch_size in (2, 3):
            skipping = StreamConfig(
                batch_size=batch_size, shuffle=shuffle, skip_bad_row_groups=True
            )
            for rank, world in RANKS:
                out[f"{order}-skipping-batches-of-{batch_size}-rank-{rank}-of-{world}"] = (
                    "bad",
                    lambda s, c=skipping, r=rank, w=world: epochs(s, c, r, w),
                )
            out[f"{order}-skipping-batches-of-{batch_size}-resumed"] = (
                "bad",
                lambda s, c=skipping: resumed(s, c),
            )
    return out


PINNED = {
    "shuffled-rank-0-of-1": "198588b356d5310e",
    "shuffled-rank-0-of-2": "a6d5b12448cbc6fb",
    "shuffled-rank-1-of-2": "9e529583e94e9f35",
    "shuffled-buffers-of-2-rank-0-of-1": "4edfe2e3bbc500fd",
    "shuffled-buffers-of-2-rank-0-of-2": "b2c0084d73eb15af",
    "shuffled-buffers-of-2-rank-1-of-2": "2e44f44845713ee7",
    "shuffled-drop-last-rank-0-of-1": "bc2e93cd380a7ab9",
    "shuffled-drop-last-rank-0-of-2": "4b98d40cb3a6a3b0",
    "shuffled-drop-last-rank-1-of-2": "909605bde08fa910",
    "file-order-rank-0-of-1": "742c72ec3e685542",
    "file-order-rank-0-of-2": "fb49110f2dbe6d5e",
    "file-order-rank-1-of-2": "4fec50da95a9de66",
    "file-order-buffers-of-2-rank-0-of-1": "63d9aeed39f56f51",
    "file-order-buffers-of-2-rank-0-of-2": "56f35c14e0de9d65",
    "file-order-buffers-of-2-rank-1-of-2": "3faba3ac0ba7c08f",
    "file-order-drop-last-rank-0-of-1": "99390005789b7a3b",
    "file-order-drop-last-rank-0-of-2": "e5d8d959c9541730",
    "file-order-drop-last-rank-1-of-2": "d6885b8138d1a65e",
    "shuffled-0-workers-rank-0-of-1": "8d7e2557d01a5931",
    "shuffled-0-workers-rank-0-of-2": "6eda1add89466156",
    "shuffled-0-workers-rank-1-of-2": "5ebefc89a5aded7d",
    "shuffled-1-workers-rank-0-of-1": "8d7e2557d01a5931",
    "shuffled-1-workers-rank-0-of-2": "6eda1add89466156",
    "shuffled-1-workers-rank-1-of-2": "5ebefc89a5aded7d",
    "shuffled-2-workers-rank-0-of-1": "4583097fab9e3bc2",
    "shuffled-2-workers-rank-0-of-2": "8ce300b845226309",
    "shuffled-2-workers-rank-1-of-2": "4bafd736106160d3",
    "shuffled-resumed-after-every-batch": "dde1eae672d0ded5",
    "shuffled-resumed-through-2-workers": "88e1dff713e94602",
    "shuffled-seq": "e4184ecfe58f24f9",
    "shuffled-conditions": "2f70b7bfe0e990af",
    "shuffled-skipping-batches-of-2-rank-0-of-1": "9f724d661bc88baf",
    "shuffled-skipping-batches-of-2-rank-0-of-2": "7f609f70755efdf0",
    "shuffled-skipping-batches-of-2-rank-1-of-2": "83ca0254c88c92e0",
    "shuffled-skipping-batches-of-2-resumed": "d579908e42ecbae4",
    "shuffled-skipping-batches-of-3-rank-0-of-1": "12f66e0b12c3c4cf",
    "shuffled-skipping-batches-of-3-rank-0-of-2": "b6d93dc42fa0f72d",
    "shuffled-skipping-batches-of-3-rank-1-of-2": "353eb9dc64780e4c",
    "shuffled-skipping-batches-of-3-resumed": "d3dfd8c24721c472",
    "file-order-0-workers-rank-0-of-1": "2c537a2c834152e7",
    "file-order-0-workers-rank-0-of-2": "cf408be5c3968cc1",
    "file-order-0-workers-rank-1-of-2": "01ccee3d1397cd4a",
    "file-order-1-workers-rank-0-of-1": "2c537a2c834152e7",
    "file-order-1-workers-rank-0-of-2": "cf408be5c3968cc1",
    "file-order-1-workers-rank-1-of-2": "01ccee3d1397cd4a",
    "file-order-2-workers-rank-0-of-1": "51df3fd618a611dc",
    "file-order-2-workers-rank-0-of-2": "d4c396d99ac41683",
    "file-order-2-workers-rank-1-of-2": "51c868ffd339fc1d",
    "file-order-resumed-after-every-batch": "37e62eb153f0a591",
    "file-order-resumed-through-2-workers": "12997931a3089e9a",
    "file-order-seq": "9d3b4bccb0f9d49f",
    "file-order-conditions": "018fbc1e03ee0579",
    "file-order-skipping-batches-of-2-rank-0-of-1": "f15bfd751aaedfd4",
    "file-order-skipping-batches-of-2-rank-0-of-2": "7c9479909aede097",
    "file-order-skipping-batches-of-2-rank-1-of-2": "bcff805fb7bd6e91",
    "file-order-skipping-batches-of-2-resumed": "b6c171673b110a2e",
    "file-order-skipping-batches-of-3-rank-0-of-1": "47f30bcd92765cde",
    "file-order-skipping-batches-of-3-rank-0-of-2": "b2e12a90337cba90",
    "file-order-skipping-batches-of-3-rank-1-of-2": "a91c9947709bac4a",
    "file-order-skipping-batches-of-3-resumed": "29b45657738178eb",
}


@pytest.mark.parametrize("case", list(cases()))
def test_batches_and_cursors_are_pinned(sources: dict[str, Path], case: str) -> None:
    source, read = cases()[case]
    assert read(sources[source]) == PINNED[case]
