"""Models built from settings and a dataset's vocabularies: shapes, tables on meta, refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recsys.data.schema import DatasetMeta
from recsys.errors import UserError
from recsys.models import build
from recsys.models.baselines import DIN, DeepFM
from recsys.models.ctr import CTRModel
from recsys.models.generative import GenerativeModel

MODEL = {"size": "L1H16A2", "max_len": 12, "negatives": 8, "causal": True, "dropout": 0.0}


def settings(**changes) -> SimpleNamespace:
    """The settings a builder reads, as a stage config's ``model`` section holds them."""
    return SimpleNamespace(**{**MODEL, "arch": "gpsd", **changes})


def lum_settings(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{"temperature": 0.05, "negatives": 0, "pack": 0, **changes})


SEQ = DatasetMeta(kind="seq", vocab={"item": 60, "category": 3}, side_features=["category"])


def tables(model) -> dict[str, tuple[int, int, str]]:
    return {
        t.name: (t.rows, t.dim, str(p.device))
        for t in model.sparse.config.tables
        for n, p in model.sparse.named_parameters()
        if n.endswith(f"{t.name}.weight")
    }


def test_the_tower_covers_the_history_and_the_candidate():
    tower = build.tower(settings(max_len=12, causal=False, dropout=0.1))
    assert (tower.layers, tower.hidden, tower.heads) == (1, 16, 2)
    assert (tower.max_len, tower.causal, tower.dropout) == (13, False, 0.1)


def test_the_generative_model_has_a_table_per_vocabulary_on_meta():
    model = build.generative_model(settings(), SEQ)
    assert isinstance(model, GenerativeModel) and model.config.negatives == 8
    assert tables(model) == {"item": (60, 16, "meta"), "category": (3, 16, "meta")}


@pytest.mark.parametrize("arch, kind", [("gpsd", CTRModel), ("deepfm", DeepFM), ("din", DIN)])
def test_the_ctr_model_is_the_one_arch_names_with_its_frozen_tables(arch, kind):
    model = build.ctr_model(settings(arch=arch), SEQ, frozen=("item",))
    assert type(model) is kind
    assert tables(model) == {"item": (60, 16, "meta"), "category": (3, 16, "meta")}
    assert model.sparse.config.frozen == ("item",)


def test_lum_covers_two_tokens_per_event_or_a_packed_row():
    meta = DatasetMeta(kind="seq", vocab={"item": 60, "liked": 2}, conditions=["liked"])
    for pack, positions in ((0, 2 * 12 + 1), (48, 48)):
        model = build.lum_model(settings(max_len=12), lum_settings(pack=pack), meta)
        assert model.config.tower.max_len == positions


def test_lum_refuses_a_dataset_without_condition_features():
    with pytest.raises(build.ModelInputError) as err:
        build.lum_model(settings(), lum_settings(), SEQ)
    assert isinstance(err.value, UserError)  # one line for the user, not a traceback
    assert str(err.value).startswith("the dataset declares no condition features")
