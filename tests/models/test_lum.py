"""LUM's user model: packing changes nothing but the layout, a group query equals separate
queries, the loss is InfoNCE at condition tokens, and a planted condition effect is learnt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from recsys.models.lum import LUM, LUMConfig, pack, packed_mask
from recsys.models.tower import TowerConfig

CONFIG = LUMConfig(
    TowerConfig.from_name("L2H16A2", max_len=64),
    items=30,
    side_features={"category": 4},
    conditions={"liked": 2},
)


KEYS = ["item", "category", "liked"]


def batch(lengths: list[int], seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    values = torch.cat(
        [
            torch.randint(0, 30, (n,), generator=g),
            torch.randint(0, 4, (n,), generator=g),
            torch.randint(0, 2, (n,), generator=g),
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=values, lengths=torch.tensor(lengths * 3)
    )


def model(config: LUMConfig = CONFIG) -> LUM:
    torch.manual_seed(0)
    return LUM(config).eval()


def test_pack_places_users_in_order_and_restarts_positions() -> None:
    layout = pack(torch.tensor([4, 2, 6, 2]), 8)
    assert layout.shape == (2, 8)
    assert layout.segments.tolist() == [[0, 0, 0, 0, 1, 1, -1, -1], [2, 2, 2, 2, 2, 2, 3, 3]]
    assert layout.positions[0, :6].tolist() == [0, 1, 2, 3, 0, 1]
    mask = packed_mask(layout.segments)[0, 0]
    assert not mask[4, :4].any() and mask[5, 4] and not mask[4, 5]  # own user, causal


def test_packing_gives_the_outputs_of_one_user_per_row() -> None:
    lum, features = model(), batch([3, 1, 4, 2])
    alone = lum.encode(features)
    packed = lum.encode(features, pack_to=10)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # Users packed together never see each other: changing user 1 leaves user 0 unchanged.
    other = batch([3, 1, 4, 2], seed=1)
    mixed = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS,
        values=torch.cat(
            [torch.cat([features[k].values()[:3], other[k].values()[3:]]) for k in KEYS]
        ),
        lengths=features.lengths(),
    )
    torch.testing.assert_close(lum.encode(mixed, pack_to=10)[:6], packed[:6])


def test_a_group_query_equals_separate_queries() -> None:
    lum, features = model(), batch([3, 1, 4])
    conditions = torch.tensor([0, 1, 1, 0])
    grouped = lum.query(features, {"liked": conditions})
    assert grouped.shape == (3, 4, 16)
    for j, condition in enumerate(conditions.tolist()):
        alone = lum.query(features, {"liked": torch.tensor([condition])})[:, 0]
        torch.testing.assert_close(grouped[:, j], alone, atol=1e-5, rtol=1e-5)
    # A query is the output the model gives at a condition token right after the history.
    events = [3, 1, 4]
    extended = []
    for k in KEYS:
        per_user = features[k].values().split(events)
        extra = {"item": 0, "category": 0, "liked": int(conditions[1])}[k]
        extended.append(torch.cat([torch.cat([v, torch.tensor([extra])]) for v in per_user]))
    longer = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS,
        values=torch.cat(extended),
        lengths=torch.tensor([e + 1 for e in events] * 3),
    )
    out = lum.encode(longer)
    ends = torch.tensor([2 * e for e in events]) + torch.tensor([0, 8, 12])  # c at 2·len
    torch.testing.assert_close(grouped[:, 1], out[ends], atol=1e-5, rtol=1e-5)


def test_the_loss_is_infonce_at_condition_tokens_against_in_batch_items() -> None:
    lum, features = model(), batch([3, 2, 4])
    out = lum(features)
    hidden = F.normalize(lum.encode(features)[0::2], dim=-1)
    ids = features["item"].values()
    table = lum.item_embeddings(ids)
    scores = hidden @ F.normalize(table, dim=-1).T / CONFIG.temperature
    expected = 0.0
    for i in range(len(ids)):
        keep = (ids != ids[i]) | (torch.arange(len(ids)) == i)
        row = scores[i][keep]
        expected += -torch.log_softmax(row, 0)[int(keep[: i + 1].sum()) - 1]
    torch.testing.assert_close(out.loss, expected / len(ids), atol=1e-5, rtol=1e-5)
    assert int(out.targets) == len(ids)


def test_a_planted_condition_effect_is_learnt() -> None:
    # Condition 1 ("liked") events are items 0-9, condition 0 events items 20-29.
    config = LUMConfig(
        TowerConfig.from_name("L1H16A2", max_len=64),
        items=30,
        conditions={"liked": 2},
        negatives=8,
        temperature=0.1,
    )
    torch.manual_seed(0)
    lum = LUM(config)
    optim = torch.optim.Adam(lum.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)

    def sample(users: int, events: int = 6) -> KeyedJaggedTensor:
        liked = torch.randint(0, 2, (users * events,), generator=g)
        item = torch.where(liked == 1, 0, 20) + torch.randint(0, 10, liked.shape, generator=g)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["item", "liked"],
            values=torch.cat([item, liked]),
            lengths=torch.tensor([events] * users * 2),
        )

    for _ in range(60):
        loss = lum(sample(16), pack_to=24).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    lum.eval()
    answers = lum.query(sample(8), {"liked": torch.tensor([1, 0])})  # [8, 2, d]
    items = F.normalize(lum.item_embeddings(torch.arange(30)), dim=-1)
    best = (F.normalize(answers, dim=-1) @ items.T).argmax(-1)  # [8, 2]
    assert (best[:, 0] < 10).all(), best  # liked → items 0-9
    assert (best[:, 1] >= 20).all(), best  # not liked → items 20-29
