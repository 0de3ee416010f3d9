"""The models against per-sample references: targets shift by one, candidates sit right after
each history, padding changes nothing, and the baselines train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from recsys.models.baselines import DIN, BaselineConfig, DeepFM
from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.generative import GenerativeConfig, GenerativeModel
from recsys.models.tower import TowerConfig

ITEMS, CATEGORIES = 30, 5
TOWER = TowerConfig.from_name("L2H16A2", max_len=16)


def seq(sequences: list[list[int]], categories: list[list[int]]) -> KeyedJaggedTensor:
    lengths = [len(s) for s in sequences]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "category"],
        values=torch.tensor([i for s in sequences for i in s] + [c for s in categories for c in s]),
        lengths=torch.tensor(lengths + lengths),
    )


def ctr(histories: list[list[int]], candidates: list[int]) -> KeyedJaggedTensor:
    lengths = [len(h) for h in histories]
    ones = [1] * len(candidates)
    items = [i for h in histories for i in h]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=torch.tensor(
            items
            + candidates
            + [i % CATEGORIES for i in items]
            + [c % CATEGORIES for c in candidates]
        ),
        lengths=torch.tensor(lengths + ones + lengths + ones),
    )


SEQUENCES = [[3, 7, 1, 9, 2], [4, 4], [8], [5, 6, 7]]
CATS = [[i % CATEGORIES for i in s] for s in SEQUENCES]


def test_generative_loss_equals_a_per_position_reference() -> None:
    torch.manual_seed(0)
    k = 6
    model = GenerativeModel(
        GenerativeConfig(
            TOWER, ITEMS, {"category": CATEGORIES}, negatives=k, side_weights={"category": 0.5}
        )
    )
    torch.manual_seed(1)
    out = model(seq(SEQUENCES, CATS))
    torch.manual_seed(1)
    negatives = torch.randint(0, ITEMS, (len(SEQUENCES) * k,)).view(len(SEQUENCES), k)
    items = model.sparse.sequence.embeddings["item"].weight
    categories = model.sparse.sequence.embeddings["category"].weight
    item_terms, side_terms, hits = [], [], 0
    for b, (ids, cats) in enumerate(zip(SEQUENCES, CATS, strict=True)):
        tokens = items[ids] + categories[cats]
        hidden = model.tower(tokens[None], torch.ones(1, len(ids), dtype=torch.bool))[0]
        for t in range(len(ids) - 1):  # position t predicts event t + 1
            scores = torch.cat(
                [(hidden[t] @ items[ids[t + 1]])[None], items[negatives[b]] @ hidden[t]]
            )
            item_terms.append(-torch.log_softmax(scores, 0)[0])
            hits += int((scores[0] > scores[1:]).all())
            logits = model.side_heads["category"](hidden[t])
            side_terms.append(F.cross_entropy(logits[None], torch.tensor([cats[t + 1]])))
    item_loss, side_loss = torch.stack(item_terms).mean(), torch.stack(side_terms).mean()
    assert out.item_loss.item() == pytest.approx(item_loss.item(), rel=1e-5)
    assert out.side_losses["category"].item() == pytest.approx(side_loss.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((item_loss + 0.5 * side_loss).item(), rel=1e-5)
    assert int(out.hits) == hits and int(out.targets) == len(item_terms)


def test_no_targets_gives_a_zero_loss_with_a_graph() -> None:
    model = GenerativeModel(GenerativeConfig(TOWER, ITEMS, {"category": CATEGORIES}, negatives=4))
    out = model(seq([[1], [2]], [[1], [2]]))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()


def test_ctr_batch_equals_each_sample_alone() -> None:
    torch.manual_seed(0)
    model = CTRModel(CTRConfig(TOWER, ITEMS, {"category": CATEGORIES})).eval()
    with torch.no_grad():
        model.segment.normal_()  # make the segments matter
    histories, candidates = [[3, 7, 1, 9], [4], [8, 2]], [5, 6, 7]
    batch = model(ctr(histories, candidates)).logits
    alone = torch.cat(
        [model(ctr([h], [c])).logits for h, c in zip(histories, candidates, strict=True)]
    )
    assert torch.allclose(batch, alone, atol=1e-5)
    # The candidate matters, and so does each history event.
    assert model(ctr([[3, 7, 1, 9]], [6])).logits != batch[0]
    assert model(ctr([[3, 7, 1, 8]], [5])).logits != batch[0]


def test_unaligned_side_feature_is_named() -> None:
    model = CTRModel(CTRConfig(TOWER, ITEMS, {"category": CATEGORIES}))
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=torch.tensor([1, 2, 3, 1, 2, 3]),
        lengths=torch.tensor([2, 1, 1, 1]),
    )
    with pytest.raises(ValueError, match="'history_category' is not aligned with 'history_item'"):
        model(bad)


@pytest.mark.parametrize("baseline", [DeepFM, DIN])
def test_baselines_learn_a_simple_rule(baseline) -> None:
    # Label: is the candidate among the history? Both baselines can see it.
    torch.manual_seed(0)
    model = baseline(BaselineConfig(ITEMS, {"category": CATEGORIES}, dim=16, hidden=(32,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    histories = [torch.randint(0, ITEMS, (5,), generator=g).tolist() for _ in range(64)]
    candidates = [h[0] if i % 2 else (h[0] + 1) % ITEMS for i, h in enumerate(histories)]
    labels = torch.tensor([float(c in h) for c, h in zip(candidates, histories, strict=True)])
    features = ctr(histories, candidates)
    first = model(features, labels).loss.item()
    for _ in range(60):
        out = model(features, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss.item() < 0.5 * first
    assert model.sparse.sequence.embeddings["item"].weight.grad is not None


@pytest.mark.parametrize("arch", ["gpsd", "din", "deepfm"])
def test_extra_features_reach_the_head(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "gpsd":
        model = CTRModel(CTRConfig(TOWER, ITEMS, {"category": CATEGORIES}, extra=3)).eval()
    else:
        cls = {"din": DIN, "deepfm": DeepFM}[arch]
        model = cls(BaselineConfig(ITEMS, {"category": CATEGORIES}, dim=16, extra=3)).eval()
    features = ctr(SEQUENCES, [1, 2, 3, 4])
    zeros, ones = torch.zeros(4, 3), torch.ones(4, 3)
    with torch.no_grad():
        a = model(features, extra=zeros).logits
        b = model(features, extra=ones).logits
        c = model(features, extra=torch.cat([zeros[:2], ones[2:]])).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, torch.cat([a[:2], b[2:]]))  # each sample's own features
    with pytest.raises(ValueError, match="takes 3 extra features"):
        model(features)
    with pytest.raises(ValueError, match="expected \\(4, 3\\)"):
        model(features, extra=torch.zeros(4, 2))


def test_int32_ids_reach_the_tables_as_int32_with_the_same_loss() -> None:
    # Streams hand out int32 ids when the tables fit: the negatives drawn for them are of the
    # same type (a concatenation with int64 negatives would widen every id again).
    torch.manual_seed(0)
    model = GenerativeModel(GenerativeConfig(TOWER, ITEMS, {"category": CATEGORIES}, negatives=6))
    wide = seq(SEQUENCES, CATS)
    narrow = KeyedJaggedTensor.from_lengths_sync(
        keys=wide.keys(), values=wide.values().int(), lengths=wide.lengths()
    )
    seen = []
    lookup = model.sparse.forward

    def spy(features: KeyedJaggedTensor):
        seen.append(features.values().dtype)
        return lookup(features)

    model.sparse.forward = spy
    torch.manual_seed(1)
    a = model(wide)
    torch.manual_seed(1)
    b = model(narrow)
    assert seen == [torch.int64, torch.int32]
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)  # the same negatives


def test_tower_tokens_place_history_and_candidate() -> None:
    """Each row: its history (+ segment 0), its candidate right after (+ segment 1), zeros
    after, gradients back to each value; rows of different lengths, an empty one too."""
    from torchrec import JaggedTensor

    from recsys.models.ctr import tower_tokens
    from recsys.models.sparse import padded

    lengths = torch.tensor([3, 0, 1])
    history = torch.randn(4, 2, requires_grad=True)
    candidate = torch.randn(3, 2, requires_grad=True)
    segment = torch.randn(2, 2, requires_grad=True)
    sequences = {
        "history_item": JaggedTensor(values=history, lengths=lengths),
        "candidate_item": JaggedTensor(values=candidate, lengths=torch.ones(3, dtype=torch.long)),
    }
    tokens, got = tower_tokens(sequences, [], segment)
    assert torch.equal(got, lengths) and tokens.shape == (3, 4, 2)
    expected = torch.zeros(3, 4, 2)
    expected[0, :3], expected[0, 3] = history[:3] + segment[0], candidate[0] + segment[1]
    expected[1, 0] = candidate[1] + segment[1]
    expected[2, 0], expected[2, 1] = history[3] + segment[0], candidate[2] + segment[1]
    assert torch.equal(tokens, expected)
    weights = torch.randn(3, 4, 2)
    (tokens * weights).sum().backward()
    assert torch.equal(history.grad, torch.cat([weights[0, :3], weights[2, :1]]))
    assert torch.equal(candidate.grad, weights[[0, 1, 2], [3, 0, 1]])
    # padded() lays out the same history rows
    rows, valid = padded(JaggedTensor(values=history.detach(), lengths=lengths))
    assert torch.equal(valid, torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]).bool())
    assert torch.equal(rows[0], history[:3].detach()) and torch.equal(rows[1], torch.zeros(3, 2))


def test_user_vectors_of_a_row_do_not_depend_on_empty_rows_beside_it() -> None:
    torch.manual_seed(0)
    model = GenerativeModel(GenerativeConfig(TOWER, ITEMS, {"category": CATEGORIES})).eval()
    with torch.no_grad():
        alone = model.user_vectors(seq([[3, 4]], [[1, 2]]))
        mixed = model.user_vectors(seq([[], [3, 4]], [[], [1, 2]]))
        nothing = KeyedJaggedTensor.from_lengths_sync(  # a batch of empty rows only
            keys=["item", "category"],
            values=torch.zeros(0, dtype=torch.long),
            lengths=torch.zeros(4, dtype=torch.long),
        )
        empty = model.user_vectors(nothing)
    assert torch.allclose(mixed[1], alone[0], atol=1e-6)
    assert empty.shape == (2, TOWER.hidden) and torch.isfinite(empty).all()
