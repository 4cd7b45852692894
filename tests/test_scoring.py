"""Batch scoring: the fused FM path against the definition, and end-to-end `score` on a real
checkpoint of the Criteo sample (one row out per row in, input order, clear errors)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ravfm.errors import UserError
from ravfm.model.fm import FM
from ravfm.scorer import PREDICTION, PREDICTION_STD, PREDICTION_STD_MODEL, FusedFM


def _fm_by_definition(
    w: torch.Tensor, w0: float, ids: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """y = w0 + sum_i x_i w_i + sum_{i<j} <v_i, v_j> x_i x_j, literally (Rendle 2010, eq. 1)."""
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        rows = w[ids[b]].double()
        xb = x[b].double()
        y = w0 + (rows[:, 0] * xb).sum()
        for i, j in itertools.combinations(range(ids.shape[1]), 2):
            y += (rows[i, 1:] @ rows[j, 1:]) * xb[i] * xb[j]
        out[b] = y
    return out


@pytest.mark.parametrize("values", ["real", "one-hot"])  # two bags, or one when x^2 = x
def test_fused_fm_matches_the_definition_and_the_model(values):
    torch.manual_seed(0)
    model = FM(50, 4, init_std=0.3)
    with torch.no_grad():
        model.table.weight[:, 0].normal_()
        model.bias.fill_(0.7)
    ids = torch.randint(1, 50, (6, 5))
    x = torch.rand(6, 5) + 0.5 if values == "real" else torch.ones(6, 5)
    ids[0, 3:], x[0, 3:] = 0, 0.0  # padding contributes nothing
    fused = FusedFM.from_model(model)
    got = fused(ids, x)
    want = _fm_by_definition(model.table.weight.detach(), 0.7, ids, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, model.predict(ids, x), rtol=1e-5, atol=1e-5)
    pad_free = _fm_by_definition(model.table.weight.detach(), 0.7, ids[:1, :3], x[:1, :3])
    torch.testing.assert_close(got[:1].double(), pad_free, rtol=1e-5, atol=1e-5)


def test_fused_fm_is_only_used_for_plain_fm():
    assert FusedFM.from_model(torch.nn.Linear(2, 2)) is None


# ---- end to end on a checkpoint of the real Criteo sample ----------------------------------


def _checkpoint(
    tmp: Path, shards: Path, model_name: str, task: str = "binary", components: int = 1
) -> Path:
    from ravfm.config import FeatureConfig, ModelConfig, RunConfig, VFMConfig, to_dict
    from ravfm.data.index import read_index
    from ravfm.distributed.world import World
    from ravfm.features.spec import build_spec
    from ravfm.train.checkpoint import save_checkpoint
    from ravfm.train.setup import build_for_training

    feats = FeatureConfig(hash_bits=12)
    spec_dir = tmp / f"spec-{model_name}"
    build_spec(read_index(shards), feats).save(spec_dir)
    cfg = RunConfig(
        name=f"t_{model_name}",
        features=feats,
        model=ModelConfig(name=model_name, k=4, init_std=0.2, vfm=VFMConfig(components=components)),
    )
    torch.manual_seed(1)
    model, _ = build_for_training(cfg, spec_dir, World.single("cpu"), n_train=8000, kind="sparse")
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1:
                p.fill_(-1.0)
    root = tmp / f"ckpt-{model_name}"
    save_checkpoint(
        root,
        1,
        model=model,
        sparse_opt=None,
        dense_opt=None,
        world=None,
        manifest={"epoch": 0, "config": to_dict(cfg), "task": task, "n_train": 8000},
        spec_dir=spec_dir,
    )
    return root


@pytest.fixture(scope="module")
def criteo(shared_data, tmp_path_factory):
    """(tmp dir, shards of the 8k Criteo sample in one split, FM checkpoint, VFM checkpoint)."""
    from ravfm.data.convert import convert

    tmp = tmp_path_factory.mktemp("score")
    shards = tmp / "shards"
    convert(
        "criteo",
        str(shared_data / "criteo" / "dac_sample_8k.txt"),
        str(shards),
        split="test",
        rows_per_shard=3000,
    )
    return tmp, shards, _checkpoint(tmp, shards, "fm"), _checkpoint(tmp, shards, "vfm")


def _with_row_ids(shards: Path, out: Path) -> Path:
    """The shards as a plain Parquet directory (no _index.json) with a `rid` column 0..N-1."""
    from ravfm.data.index import split_paths

    out.mkdir(exist_ok=True)
    start = 0
    for i, path in enumerate(split_paths(shards, "test")):
        t = pq.read_table(path)
        t = t.append_column("rid", pa.array(np.arange(start, start + t.num_rows)))
        pq.write_table(t, out / f"part-{i}.parquet")
        start += t.num_rows
    return out


def _read_in_name_order(out: Path) -> pa.Table:
    from ravfm.scored import read_scores

    files = sorted(out.glob("part-*.parquet"))
    assert files and (out / "_SUCCESS").is_file()
    got = read_scores(str(out))  # checks the marker and every part against the manifest
    assert got.equals(pa.concat_tables([pq.read_table(f) for f in files]))
    return got


def _expected(checkpoint: Path, shards: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from ravfm.data.index import split_paths
    from ravfm.features.transform import transform
    from ravfm.train.checkpoint import load_model

    model, spec, meta = load_model(checkpoint)
    table = pa.concat_tables([pq.read_table(p) for p in split_paths(shards, "test")])
    out = transform(table, spec)
    ids, x = torch.from_numpy(out["ids"]), torch.from_numpy(out["values"])
    with torch.no_grad():
        if meta["config"]["model"]["name"] == "vfm":
            raw, std = model.predict(ids, x, return_std=True)
            p = torch.sigmoid(raw)
            return p.numpy(), (p * (1 - p) * std).numpy()
        return torch.sigmoid(model.forward(ids, x)).numpy(), None


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, engine",
    [("fm", "local"), ("vfm", "local"),
     pytest.param("fm", "ray", marks=pytest.mark.ray), pytest.param("vfm", "ray", marks=pytest.mark.ray)],
)  # fmt: skip
def test_score_writes_one_row_per_input_row_in_order(criteo, request, model_name, engine):
    from ravfm.scoring import score

    if engine == "ray":
        request.getfixturevalue("ray_local")
    tmp, shards, fm_ckpt, vfm_ckpt = criteo
    ckpt = fm_ckpt if model_name == "fm" else vfm_ckpt
    src = _with_row_ids(shards, tmp / "with_rid")
    out = tmp / f"out-{model_name}-{engine}"
    summary = score(str(ckpt), str(src), str(out), keep=["rid", "label"], batch_size=1000,
                    engine=engine)  # fmt: skip
    got = _read_in_name_order(out)
    assert summary["engine"] == engine
    assert summary["rows"] == got.num_rows == 8000 and summary["parts"] == 3
    assert got.column("rid").to_pylist() == list(range(8000))
    want, want_std = _expected(ckpt, shards)
    np.testing.assert_allclose(got.column(PREDICTION).to_numpy(), want, rtol=1e-5, atol=1e-6)
    if model_name == "vfm":
        for col in (PREDICTION_STD, PREDICTION_STD_MODEL):  # clicks: both are the model's
            np.testing.assert_allclose(got.column(col).to_numpy(), want_std, rtol=1e-4, atol=1e-7)
    else:
        assert PREDICTION_STD not in got.column_names


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "raw"])
def test_score_reads_shard_directories_and_raw_files(criteo, shared_data, source):
    from ravfm.scoring import score

    tmp, shards, fm_ckpt, _ = criteo
    src = shards if source == "shards" else shared_data / "criteo" / "dac_sample_8k.txt"
    out = tmp / f"out-{source}"
    score(str(fm_ckpt), str(src), str(out), keep=["label"], batch_size=2500)
    got = _read_in_name_order(out)
    want, _ = _expected(fm_ckpt, shards)  # convert keeps the file's row order
    np.testing.assert_allclose(got.column(PREDICTION).to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_missing_required_column_is_one_clear_line(criteo):
    from ravfm.scoring import score

    tmp, shards, fm_ckpt, _ = criteo
    bad = tmp / "no_c7.parquet"
    from ravfm.data.index import split_paths

    table = pq.read_table(split_paths(shards, "test")[0])
    pq.write_table(table.drop_columns(["C7"]), bad)
    with pytest.raises(UserError) as e:
        score(str(fm_ckpt), str(bad), str(tmp / "out-bad"), keep=[])
    assert "'C7'" in str(e.value) and "\n" not in str(e.value)


def test_unknown_keep_column_and_nonempty_output_are_refused(criteo):
    from ravfm.scoring import score

    tmp, shards, fm_ckpt, _ = criteo
    with pytest.raises(UserError, match="--keep names 'nope'"):
        score(str(fm_ckpt), str(shards), str(tmp / "out-keep"), keep=["nope"])
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(UserError, match="already holds other files"):
        score(str(fm_ckpt), str(shards), str(busy), keep=[])


def test_shards_of_another_dataset_name_the_differing_key(criteo, shared_data):
    from ravfm.data.convert import convert
    from ravfm.scoring import score

    tmp, _, fm_ckpt, _ = criteo
    avazu = tmp / "avazu"
    if not avazu.exists():
        convert(
            "avazu", str(shared_data / "avazu" / "avazu_sample_9k.csv"), str(avazu), split="test"
        )
    with pytest.raises(UserError, match="holds avazu shards but the feature spec is for criteo"):
        score(str(fm_ckpt), str(avazu), str(tmp / "out-avazu"), keep=[])
    shutil.rmtree(tmp / "out-avazu", ignore_errors=True)


@pytest.mark.parametrize("model_name", ["fm", "vfm"])
def test_load_model_holds_exactly_the_saved_rows(criteo, model_name):
    """load_model builds its tables without drawing an init (skip_init): every row and dense
    parameter must still be the saved one, never a zero left from the skipped draw."""
    from ravfm.train.checkpoint import load_model

    tmp, shards, *_ = criteo
    ckpt = _checkpoint(tmp / "again", shards, model_name)  # same seed: same model as saved
    model, _, _ = load_model(ckpt)
    from ravfm.config import FeatureConfig, ModelConfig, RunConfig
    from ravfm.distributed.world import World
    from ravfm.train.setup import build_for_training

    cfg = RunConfig(name="x", features=FeatureConfig(hash_bits=12),
                    model=ModelConfig(name=model_name, k=4, init_std=0.2))  # fmt: skip
    torch.manual_seed(1)
    saved, _ = build_for_training(
        cfg, tmp / "again" / f"spec-{model_name}", World.single("cpu"), n_train=8000, kind="sparse"
    )
    with torch.no_grad():
        for p in saved.parameters():
            if p.numel() == 1:
                p.fill_(-1.0)
    got, want = model.state_dict(), saved.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids, rows = model.table.export_rows()
    assert rows.abs().sum() > 0 and torch.equal(rows, saved.table.export_rows()[1])


def test_vfm_mixture_checkpoint_loads_and_refuses_a_one_component_model(criteo):
    from ravfm.config import FeatureConfig, ModelConfig, RunConfig
    from ravfm.distributed.world import World
    from ravfm.scorer import Scorer
    from ravfm.train.checkpoint import load_checkpoint, load_model
    from ravfm.train.setup import build_for_training

    tmp, shards, *_ = criteo
    ckpt = _checkpoint(tmp / "mixture", shards, "vfm", components=3)
    model, _, _ = load_model(ckpt)
    assert model.components == 3 and model.table.dim == 3 * (2 * 4 + 2)
    table = pq.read_table(shards).slice(0, 64)
    out = Scorer(str(ckpt))(table)
    assert out.num_rows == 64 and np.all(out[PREDICTION_STD].to_numpy() > 0)
    cfg = RunConfig(name="x", features=FeatureConfig(hash_bits=12),
                    model=ModelConfig(name="vfm", k=4))  # fmt: skip
    one, _ = build_for_training(
        cfg, tmp / "mixture" / "spec-vfm", World.single("cpu"), n_train=8000, kind="sparse"
    )
    with pytest.raises(UserError, match=r"does not fit this model \(bias_logvar has shape \(3,\)"):
        load_checkpoint(ckpt, model=one)
