"""Typed run configuration: frozen dataclasses, YAML load, dotted CLI overrides, validation.

Defaults live here; a YAML job file and `key=value` overrides only change them. Every user
mistake is a UserError (a ValueError) whose one-line message names the key and what to do.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ravfm.errors import UserError

__all__ = [
    "DataConfig",
    "FeatureConfig",
    "ModelConfig",
    "VFMConfig",
    "RaFMConfig",
    "EmbeddingConfig",
    "OptimConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
]

DATASETS = ("criteo", "avazu", "movielens", "libsvm")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class DataConfig:
    """Where the raw data comes from and where its Parquet shards go."""

    dataset: str = "criteo"
    source: str | None = None  # path, glob or fsspec URL of the raw file(s); None = synthetic
    shards: str = ""  # Parquet shard directory; "" = data/<name>
    variant: str = "auto"  # movielens: ml-100k | ml-1m | ml-10m | ml-20m | ml-25m | latest
    split: str = "hash"  # hash (seeded 8:1:1) or a standard split name (u1..u5, ua, ub)
    split_ratios: tuple[float, float, float] = (8.0, 1.0, 1.0)
    rows_per_shard: int = 1_000_000
    max_reject_rate: float = 0.001
    synth_rows: int = 200_000  # rows of synthetic data when source is None

    def __post_init__(self) -> None:
        _one_of("data.dataset", self.dataset, DATASETS)
        _check(
            len(self.split_ratios) == 3
            and all(r >= 0 for r in self.split_ratios)
            and self.split_ratios[0] > 0,
            f"data.split_ratios={list(self.split_ratios)} must be three non-negative "
            "numbers (train, valid, test) with train > 0",
        )
        _check(self.rows_per_shard > 0, "data.rows_per_shard must be positive")
        _check(0.0 <= self.max_reject_rate <= 1.0, "data.max_reject_rate must be in [0, 1]")
        _check(self.synth_rows > 0, "data.synth_rows must be positive")


@dataclass(frozen=True)
class FeatureConfig:
    """How raw columns become row ids of the embedding table (the FeatureSpec's inputs)."""

    hash_bits: int = 20  # shared table of 2**hash_bits rows
    id_space: str = "shared"  # shared (one table, per-field seeds) | per_field (offsets)
    numeric: str = "log2"  # log2 (Criteo rule: v > 2 -> floor(ln(v)^2)) | quantile
    quantile_buckets: int = 32
    min_count: int = 1  # ids seen fewer times in train fold into one OOV row per field
    fields: tuple[str, ...] = ()  # () = the dataset's default feature columns
    seed: int = 0

    def __post_init__(self) -> None:
        _check(4 <= self.hash_bits <= 40, f"features.hash_bits={self.hash_bits} must be in 4..40")
        _one_of("features.id_space", self.id_space, ("shared", "per_field"))
        _one_of("features.numeric", self.numeric, ("log2", "quantile"))
        _check(self.quantile_buckets >= 2, "features.quantile_buckets must be >= 2")
        _check(self.min_count >= 1, "features.min_count must be >= 1")


@dataclass(frozen=True)
class VFMConfig:
    """Variational FM: KL weights per term and Monte Carlo settings."""

    lambda_bias: float = 1.0
    lambda_linear: float = 1.0
    lambda_latent: float = 1.0
    init_logvar: float = -10.0
    train_samples: int = 1  # reparameterised samples per training step
    learn_noise: bool = False  # regression: learn the observation-noise variance (Gaussian NLL)
    # q is a uniform mixture of this many independently fitted mean-field Gaussians (one table
    # row holds all of them: M times the memory and compute of one)
    components: int = 1

    def __post_init__(self) -> None:
        _check(self.train_samples >= 0, "model.vfm.train_samples must be >= 0 (0 = exact)")
        _check(
            self.components >= 1,
            f"model.vfm.components={self.components} must be >= 1 (1 = one Gaussian posterior)",
        )


@dataclass(frozen=True)
class RaFMConfig:
    """Rank-Aware FM: ranks k_1 < ... < k_m and the count thresholds between them."""

    ranks: tuple[int, ...] = (4, 16)
    thresholds: tuple[int, ...] = (50,)  # a feature reaches level j+1 when count > thresholds[j]
    distill_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(
            len(self.ranks) >= 1 and all(a < b for a, b in zip(self.ranks, self.ranks[1:])),
            f"model.rafm.ranks={list(self.ranks)} must be strictly increasing",
        )
        _check(
            len(self.thresholds) == len(self.ranks) - 1,
            f"model.rafm.thresholds needs {len(self.ranks) - 1} value(s), one per rank above "
            f"the first; got {list(self.thresholds)}",
        )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fm"  # fm | vfm | rafm
    k: int = 16
    task: str = "auto"  # auto (from the dataset) | binary | regression
    init_std: float = 0.01
    l2_linear: float = 0.0
    l2_factors: float = 0.0
    vfm: VFMConfig = field(default_factory=VFMConfig)
    rafm: RaFMConfig = field(default_factory=RaFMConfig)

    def __post_init__(self) -> None:
        _one_of("model.name", self.name, ("fm", "vfm", "rafm"))
        _one_of("model.task", self.task, ("auto", "binary", "regression"))
        _check(self.k >= 1, f"model.k={self.k} must be >= 1")
        _check(self.l2_linear >= 0 and self.l2_factors >= 0, "model.l2_* must be >= 0")


@dataclass(frozen=True)
class EmbeddingConfig:
    sharding: str = "replicated"  # replicated | rows (row r lives on rank r % W)

    def __post_init__(self) -> None:
        _one_of("embedding.sharding", self.sharding, ("replicated", "rows"))


@dataclass(frozen=True)
class OptimConfig:
    sparse: str = "adagrad"  # adagrad | adam | sgd, for embedding rows (only touched rows)
    lr: float = 0.05
    dense: str = "adam"  # torch.optim for bias / VFM priors
    dense_lr: float = 0.01
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    initial_accumulator: float = 0.0
    rowwise: bool = False  # adagrad: one accumulator per row (TorchRec's row-wise Adagrad)
    clip_norm: float = 0.0  # 0 = no gradient clipping
    schedule: str = "constant"  # constant | cosine | step
    warmup_steps: int = 0
    step_gamma: float = 0.5  # schedule=step: multiply lr by this each epoch

    def __post_init__(self) -> None:
        _one_of("optim.sparse", self.sparse, ("adagrad", "adam", "sgd"))
        _one_of("optim.dense", self.dense, ("adam", "sgd", "adagrad"))
        _one_of("optim.schedule", self.schedule, ("constant", "cosine", "step"))
        _check(self.lr > 0 and self.dense_lr > 0, "optim.lr and optim.dense_lr must be > 0")
        _check(self.clip_norm >= 0, "optim.clip_norm must be >= 0 (0 disables clipping)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 8192
    eval_batch_size: int = 65536
    # auto: one worker on this machine (no --address) trains in this process without Ray;
    # ray: always through Ray Train; local: always in this process (one worker)
    engine: str = "auto"
    num_workers: int = 0  # 0 = sized from the cluster's CPUs (or GPUs)
    cpus_per_worker: float = 0.0  # 0 = leave room for Ray Data ingest automatically
    use_gpu: bool = False
    bf16: bool = False  # autocast on GPU only
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each epoch end only
    keep_checkpoints: int = 2
    max_failures: int = 0
    early_stopping_patience: int = 0  # epochs without improvement; 0 = off
    early_stopping_metric: str = "auto"  # auto (auc or rmse by task) | auc | logloss | rmse
    shuffle_buffer: int = 65536  # rows in the per-worker local shuffle buffer; 0 = off
    max_steps: int = 0  # 0 = no cap (useful for smoke runs)
    log_every: int = 50

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train.*batch_size must be >= 1")
        _check(self.num_workers >= 0, "train.num_workers must be >= 0 (0 = auto)")
        _one_of("train.engine", self.engine, ("auto", "local", "ray"))
        _check(self.cpus_per_worker >= 0, "train.cpus_per_worker must be >= 0 (0 = auto)")
        _one_of(
            "train.early_stopping_metric",
            self.early_stopping_metric,
            ("auto", "auc", "logloss", "rmse"),
        )
        _check(self.max_failures >= -1, "train.max_failures must be >= -1 (-1 = unlimited)")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a plain name")

    @property
    def task(self) -> str:
        """binary for click data, regression for ratings (unless model.task says otherwise)."""
        if self.model.task != "auto":
            return self.model.task
        return "regression" if self.data.dataset == "movielens" else "binary"

    @property
    def shards_dir(self) -> str:
        return self.data.shards or str(Path("data") / self.name)

    @property
    def run_dir(self) -> str:
        return str(Path(self.runs_dir) / self.name)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        _check(len(value) == len(args), f"{key} must have {len(args)} items, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{key} must be an integer, got {value!r}",
        )
        return value
    if tp is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{key} must be a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        _check(isinstance(child, dict), f"override {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, returning a copy."""
    import copy

    out = copy.deepcopy(tree)
    for item in overrides:
        _check(
            "=" in item and not item.startswith("="),
            f"override {item!r} must look like section.key=value, e.g. train.epochs=3",
        )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then dotted overrides; validated once."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        _check(p.is_file(), f"config file {p} does not exist; pass a path such as jobs/smoke.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(
                f"config file {p} is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        _check(loaded is None or isinstance(loaded, dict), f"config file {p} must hold a mapping")
        tree = loaded or {}
    tree = apply_overrides(tree, overrides or [])
    return from_dict(RunConfig, tree)
