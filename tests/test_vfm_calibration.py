"""VFM's scored uncertainty means what it says: on MovieLens 100K (u1), the held-out ratings
fall inside prediction +- 2 prediction_std about 95% of the time (posterior + noise variance,
the noise estimated on train rows kept out of training, since u1 has no valid split)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_scored_std_covers_held_out_ratings(tmp_path, shared_data):
    from ravfm.config import load_config
    from ravfm.driver import train
    from ravfm.scored import read_scores
    from ravfm.scoring import score
    from ravfm.train.checkpoint import read_manifest

    cfg = load_config(
        "jobs/movielens_vfm.yaml",
        [f"runs_dir={tmp_path / 'runs'}", f"data.source={shared_data / 'movielens' / 'ml-100k'}",
         f"data.shards={tmp_path / 'u1'}", "train.epochs=6", "model.k=8",
         "model.vfm.components=1", "train.batch_size=2048"],
    )  # fmt: skip
    summary = train(cfg)
    assert summary["noise_from"].startswith("5% of train") and 0.3 < summary["noise_var"] < 1.5
    ckpt = str(tmp_path / "runs" / cfg.name / "checkpoints")
    assert read_manifest(ckpt)["noise_var"] == pytest.approx(summary["noise_var"])
    score(ckpt, str(tmp_path / "u1"), str(tmp_path / "out"), keep=["rating"], split="test")
    got = read_scores(str(tmp_path / "out"))
    y, pred = got["rating"].to_numpy(), got["prediction"].to_numpy()
    std, model_std = got["prediction_std"].to_numpy(), got["prediction_std_model"].to_numpy()
    assert len(y) == 20_000 and pred.min() >= 1.0 and pred.max() <= 5.0  # clipped to [1, 5]
    np.testing.assert_allclose(std**2, model_std**2 + summary["noise_var"], rtol=1e-4)
    coverage = float(np.mean(np.abs(y - pred) <= 2 * std))
    assert 0.93 <= coverage <= 0.97, coverage
    assert np.mean(np.abs(y - pred) <= 2 * model_std) < 0.8  # the posterior part alone is not
