"""The accuracy bench's goal check: each goal of the models issue, measured, met or not."""

from bench.accuracy import _goals, _goals_markdown


def _res(fm_rmse: float, vfm_rmse: float, coverage: float, rafm_params: int) -> dict:
    return {
        "ml-100k": {"fm": {"rmse": fm_rmse}, "vfm": {"rmse": vfm_rmse, "coverage_2std": coverage}},
        "frappe": {
            "fm": {"auc": 0.937, "params": 100},
            "rafm": {"auc": 0.941, "params": rafm_params},
        },
    }


def test_goals_met_and_missed_each_named():
    goals = {g["goal"]: g["met"] for g in _goals(_res(0.9144, 0.9049, 0.946, 90))}
    assert len(goals) == 5
    assert goals["ml-100k FM RMSE < 0.92"]
    assert not goals["ml-100k VFM RMSE (MCMC anchor 0.8996, SVD 0.938) <= 0.9"]
    assert goals["ml-100k VFM share inside mean +- 2 sd >= 0.93"]
    assert goals["ml-100k VFM share inside mean +- 2 sd <= 0.97"]
    assert goals["frappe RaFM AUC > FM AUC with params <= FM's"]


def test_goals_boundaries_and_parameter_budget():
    goals = {g["goal"]: g["met"] for g in _goals(_res(0.92, 0.900, 0.98, 101))}
    assert not goals["ml-100k FM RMSE < 0.92"]  # strictly below
    assert goals["ml-100k VFM RMSE (MCMC anchor 0.8996, SVD 0.938) <= 0.9"]  # at or below
    assert not goals["ml-100k VFM share inside mean +- 2 sd <= 0.97"]
    assert not goals["frappe RaFM AUC > FM AUC with params <= FM's"]  # more parameters than FM
    assert "NOT MET" in _goals_markdown(_goals(_res(0.92, 0.9, 0.98, 101)))


def test_goals_skip_datasets_not_measured():
    assert _goals({}) == []
