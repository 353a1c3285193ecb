"""The validated shape of ``federation.yaml`` and ``governance.yaml``.

Configs are validated eagerly and completely: a user fixing a file wants every bad key in
one message, each with the file, the key, the bad value and what is allowed. Relative paths
are resolved against the folder of the file that names them, like DVC and docker-compose do,
so a config means the same thing whatever the current directory is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from quorum.configs.errors import ConfigError, UnknownSite

_FROZEN = ConfigDict(extra="forbid", frozen=True)
M = TypeVar("M", bound=BaseModel)


class SiteConfig(BaseModel):
    """One site: where its data lives and which columns mean what."""

    model_config = _FROZEN

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    root: Path
    data: Path = Path("raw/train.csv")
    current: Path | None = Path("raw/current.csv")
    target: str = "label"
    id_column: str | None = None
    pii_columns: tuple[str, ...] = ()
    # drop: PII columns are removed; hash: replaced by HMAC-SHA256 under a salt kept at the site
    # (<root>/.salt), so site-local joins on them still work while no raw value survives
    pii_mode: Literal["drop", "hash"] = "drop"
    protected_attribute: str | None = None
    # where `quorum data push` sends this site's processed data: a folder (relative to the config
    # file) or a DVC remote URL; by default <root>/.dvc-remote, inside the site's own folder
    dvc_remote: str | None = None
    # for an S3-compatible DVC remote that is not AWS (MinIO, Ceph): its endpoint
    dvc_endpoint_url: str | None = None
    # an AWS shared-credentials file kept at the site: its worker and its DVC remote use it, and no
    # other process is ever given it (relative to the config file)
    aws_credentials_file: Path | None = None
    # placement: policy tags a job's placement.require is matched against (e.g. jurisdiction: eu),
    # how many jobs the site runs at once (its work pool's concurrency limit; None: no limit) and
    # what one training round there costs (counted against a job's placement.budget)
    tags: dict[str, str] = Field(default_factory=dict)
    concurrency: int | None = Field(default=None, ge=1, le=1000)
    cost_per_round: float = Field(default=0.0, ge=0.0)

    @property
    def remote_url(self) -> str:
        """The site's own DVC remote: only this site's data is ever pushed there."""
        return self.dvc_remote if self.dvc_remote is not None else str(self.root / ".dvc-remote")

    @property
    def data_path(self) -> Path:
        return self.root / self.data

    @property
    def current_path(self) -> Path | None:
        return None if self.current is None else self.root / self.current

    @property
    def processed_dir(self) -> Path:
        return self.root / "processed"

    @property
    def reports_dir(self) -> Path:
        """Full tool reports (data docs, drift HTML) that never leave the site."""
        return self.root / "reports"


class FeatureConfig(BaseModel):
    """The shared feature schema: every site must provide these columns."""

    model_config = _FROZEN

    numeric: tuple[str, ...] = Field(min_length=1)
    categorical: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("categorical")
    @classmethod
    def _non_empty_domains(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        empty = [name for name, domain in value.items() if not domain]
        if empty:
            raise ValueError(f"categorical columns need at least one allowed value: {', '.join(empty)}")
        return value

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)


class ContractConfig(BaseModel):
    """Bounds of the data contract each site's raw data must meet."""

    model_config = _FROZEN

    min_rows: int = Field(default=50, ge=1)
    max_rows: int = Field(default=50_000_000, ge=1)
    max_null_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    numeric_ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    label_rate: tuple[float, float] = (0.01, 0.99)
    # per-column overrides of max_null_fraction (a profile writes the observed rate plus a margin)
    null_fractions: dict[str, float] = Field(default_factory=dict)
    # narrower allowed values than features.categorical for some columns; never values outside it
    categorical_domains: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered_bounds(self) -> ContractConfig:
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) must not exceed max_rows ({self.max_rows})")
        fractions = [name for name, value in self.null_fractions.items() if not 0.0 <= value <= 1.0]
        if fractions:
            raise ValueError(f"null_fractions must lie in [0, 1]: {', '.join(fractions)}")
        empty = [name for name, domain in self.categorical_domains.items() if not domain]
        if empty:
            raise ValueError(f"categorical_domains need at least one allowed value: {', '.join(empty)}")
        bad = [name for name, (low, high) in self.numeric_ranges.items() if low > high]
        if bad:
            raise ValueError(f"numeric_ranges need [low, high] with low <= high: {', '.join(bad)}")
        if not 0.0 <= self.label_rate[0] <= self.label_rate[1] <= 1.0:
            raise ValueError("label_rate must be [low, high] with 0 <= low <= high <= 1")
        return self


class ModelConfig(BaseModel):
    model_config = _FROZEN

    hidden_sizes: tuple[int, ...] = Field(default=(32, 16), min_length=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


Strategy = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"]
Aggregation = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]


class PrivacyConfig(BaseModel):
    """DP-FedAvg: clip each site's update, noise the average, stop when the epsilon budget would be spent."""

    model_config = _FROZEN

    enabled: bool = False
    clip_norm: float = Field(default=1.0, gt=0.0)
    noise_multiplier: float = Field(default=1.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    epsilon_budget: float = Field(default=10.0, gt=0.0)


class SecAggConfig(BaseModel):
    """SecAgg+ knobs (used with ``secure_aggregation: true``): the neighbourhood, the threshold, the clip.

    ``num_shares``: each site's secrets are split among itself and ``num_shares - 1`` neighbours (odd;
    unset: 2 * ceil(log2 n) + 1, capped at the round's sites). ``threshold``: shares that rebuild a
    secret, an int or a fraction of ``num_shares``; always a strict majority (unset: the smallest one).
    ``clip_norm``: each site clips its update delta to this L2 norm before masking.
    """

    model_config = _FROZEN

    num_shares: int | None = Field(default=None, ge=3)
    threshold: int | float | None = None
    clip_norm: float = Field(default=10.0, gt=0.0, le=1e6)

    @model_validator(mode="after")
    def _majority(self) -> SecAggConfig:
        problems = []
        if self.num_shares is not None and self.num_shares % 2 == 0:
            problems.append(f"num_shares {self.num_shares} must be odd: a site's neighbours sit on both sides of it")
        if isinstance(self.threshold, float) and not 0.5 < self.threshold <= 1.0:
            problems.append(f"threshold {self.threshold} as a fraction must be in (0.5, 1]: a strict majority")
        if isinstance(self.threshold, int):
            if self.threshold < 2:
                problems.append(f"threshold {self.threshold} must be at least 2")
            elif self.num_shares is not None and not self.num_shares // 2 < self.threshold <= self.num_shares:
                problems.append(
                    f"threshold {self.threshold} must be a strict majority of num_shares {self.num_shares} "
                    f"({self.num_shares // 2 + 1}..{self.num_shares})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TrainingConfig(BaseModel):
    """How sites train and how the coordinator combines their updates; the defaults are plain FedAvg."""

    model_config = _FROZEN

    strategy: Strategy = "fedavg"
    rounds: int = Field(default=5, ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=0.05, gt=0.0, le=10.0)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    min_sites: int = Field(default=1, ge=1)
    positive_weight: Literal["balanced", "none"] = "balanced"
    proximal_mu: float = Field(default=0.0, ge=0.0, le=100.0)
    server_lr: float | None = Field(default=None, gt=0.0, le=100.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, validation_alias=AliasChoices("beta1", "server_momentum"))
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0, le=1.0)
    aggregation: Aggregation = "mean"
    trim_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    num_byzantine: int = Field(default=0, ge=0)
    multi_krum_m: int = Field(default=1, ge=1)
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    max_norm_ratio: float | None = Field(default=None, gt=1.0)
    start_from: Literal["scratch", "champion", "checkpoint"] = "scratch"
    checkpoint: Path | None = None
    freeze_layers: int = Field(default=0, ge=0)
    secure_aggregation: bool = False
    secagg: SecAggConfig = SecAggConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _compatible(self) -> TrainingConfig:
        """Combinations that cannot work together, all reported at once, each with what to change."""
        problems = []
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            problems.append("strategy fedprox needs proximal_mu > 0 (e.g. 0.01)")
        if self.strategy != "fedprox" and self.proximal_mu > 0:
            problems.append(f"proximal_mu applies only to strategy fedprox (strategy is {self.strategy})")
        if self.server_lr is not None and self.server_optimizer == "fedavg":
            problems.append(f"server_lr applies only to strategies fedavgm, fedadam, fedyogi (not {self.strategy})")
        if self.start_from == "checkpoint" and self.checkpoint is None:
            problems.append("start_from checkpoint needs checkpoint: the path of an .npz of start weights")
        if self.start_from != "checkpoint" and self.checkpoint is not None:
            problems.append(f"checkpoint is set but start_from is {self.start_from} (set start_from: checkpoint)")
        if self.freeze_layers and self.start_from == "scratch":
            problems.append("freeze_layers keeps layers at their start values: use start_from champion or checkpoint")
        if self.secure_aggregation:
            if self.aggregation != "mean":
                problems.append(
                    f"secure_aggregation reveals only the sum of the updates, so aggregation must be mean "
                    f"(not {self.aggregation}): robust rules need each update"
                )
            if self.privacy.enabled:
                problems.append("secure_aggregation cannot be combined with privacy: clipping needs each update")
            if self.max_norm_ratio is not None:
                problems.append("secure_aggregation hides each update's norm: remove max_norm_ratio")
        if self.privacy.enabled and self.aggregation != "mean":
            problems.append(
                f"privacy bounds one site's effect on the mean of clipped updates: aggregation must be mean "
                f"(not {self.aggregation})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def server_optimizer(self) -> Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]:
        """What the coordinator does with the aggregate: FedProx changes local training only."""
        return "fedavg" if self.strategy in ("fedavg", "fedprox") else self.strategy  # type: ignore[return-value]

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the usual default: 1 for FedAvgM, 0.01 for the adaptive optimizers (Reddi et al.)."""
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if self.server_optimizer in ("fedavg", "fedavgm") else 0.01

    def sites_per_round(self, num_sites: int) -> int:
        """How many sites a round asks (``quorum.tasks.strategies.sample_sites`` draws exactly this many)."""
        return min(num_sites, max(self.min_sites, math.ceil(self.sample_fraction * num_sites)))


class PlacementConfig(BaseModel):
    """Which sites a job may use and which of them each round asks (``quorum.tasks.placement``).

    ``require`` maps a tag to the value (or any of the values) a site must carry to receive anything of
    the job. ``sampler`` uniform is the seeded draw; guided weighs each site's recent loss x examples
    against its measured round time (Oort-like), keeping every eligible site in at least ``min_share``
    of the rounds. ``budget`` caps the summed ``cost_per_round`` of the sites asked.
    """

    model_config = _FROZEN

    require: dict[str, str | tuple[str, ...]] = Field(default_factory=dict)
    sampler: Literal["uniform", "guided"] = "uniform"
    min_share: float = Field(default=0.1, ge=0.0, le=1.0)
    speed_weight: float = Field(default=2.0, ge=0.0, le=10.0)
    budget: float | None = Field(default=None, ge=0.0)
    queue_timeout_s: float = Field(default=3600.0, gt=0.0)

    @field_validator("require")
    @classmethod
    def _non_empty_values(cls, value: dict[str, str | tuple[str, ...]]) -> dict[str, str | tuple[str, ...]]:
        empty = [tag for tag, wanted in value.items() if not wanted]
        if empty:
            raise ValueError(f"require needs at least one allowed value per tag: {', '.join(empty)}")
        return value

    def allowed(self, tag: str) -> tuple[str, ...]:
        wanted = self.require[tag]
        return (wanted,) if isinstance(wanted, str) else tuple(wanted)

    def why_not(self, site: SiteConfig) -> str | None:
        """Why ``site`` may not receive anything of this job, or None when it meets every requirement."""
        misses = []
        for tag in sorted(self.require):
            allowed = self.allowed(tag)
            shown = allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)
            if tag not in site.tags:
                misses.append(f"has no tag {tag} (required: {shown})")
            elif site.tags[tag] not in allowed:
                misses.append(f"tag {tag} is {site.tags[tag]} (required: {shown})")
        return "; ".join(misses) or None


class GatePolicy(BaseModel):
    """Thresholds ``quorum.evaluation.gates.decide`` applies; ``None`` switches a gate off."""

    model_config = _FROZEN

    min_accuracy: float | None = Field(default=0.7, ge=0.0, le=1.0)
    min_auc: float | None = Field(default=0.7, ge=0.0, le=1.0)
    min_f1: float | None = Field(default=None, ge=0.0, le=1.0)
    max_log_loss: float | None = Field(default=None, gt=0.0)
    min_site_accuracy: float | None = Field(default=0.6, ge=0.0, le=1.0)
    max_regression: float | None = Field(default=0.02, ge=0.0, le=1.0)
    max_selection_rate_gap: float | None = Field(default=0.25, ge=0.0, le=1.0)
    max_tpr_gap: float | None = Field(default=None, ge=0.0, le=1.0)
    min_sites: int = Field(default=1, ge=1)
    # share of the configured sites whose updates trained the candidate (0.75: 6 of 8, 3 of 4, every site of 3)
    min_site_fraction: float = Field(default=0.75, ge=0.0, le=1.0)
    min_examples: int = Field(default=1, ge=1)
    max_calibration_error: float | None = Field(default=None, ge=0.0, le=1.0)
    max_site_regression: float | None = Field(default=None, ge=0.0, le=1.0)
    site_regression_metric: Literal["auc", "accuracy"] = "auc"
    fairness_per_site: bool = False
    min_group_size: int = Field(default=20, ge=1)


class DriftConfig(BaseModel):
    model_config = _FROZEN

    drift_share: float = Field(default=0.3, ge=0.0, le=1.0)
    min_sites_to_retrain: int = Field(default=1, ge=1)
    min_rows: int = Field(default=30, ge=1)
    html_report: bool = True


class StorageConfig(BaseModel):
    """Where the artifact store lives: a folder under ``state_dir`` by default, or S3.

    Credentials are never configured here: each process takes them from its own environment
    (standard AWS variables or shared-credentials file), so every site can hold its own.
    """

    model_config = _FROZEN

    artifacts: str | None = None  # s3://bucket/prefix; None keeps the store in <state_dir>/artifacts
    endpoint_url: str | None = None  # any S3-compatible service (MinIO, Ceph); None means AWS itself
    region: str | None = None
    multipart_threshold_mb: int = Field(default=64, ge=5, le=5_000)
    retry_deadline_s: float = Field(default=120.0, gt=0)

    @field_validator("artifacts")
    @classmethod
    def _s3_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError(f"{value!r} is not an s3:// URL (leave storage.artifacts unset for a local folder)")
        return value


class DeploymentConfig(BaseModel):
    """Where the servers listen and when scheduled work runs (``quorum up``, ``infra/prefect.yaml``).

    Database URLs may name environment variables as ``${NAME}`` so passwords stay out of the file.
    """

    model_config = _FROZEN

    prefect_port: int = Field(default=4200, ge=1024, le=65535)
    mlflow_port: int = Field(default=5000, ge=1024, le=65535)
    # Prefect's database; None keeps SQLite under <state_dir>/prefect (`quorum up --database` overrides)
    prefect_database: str | None = None
    # MLflow's tracking and registry store; None keeps SQLite under <state_dir>/mlflow
    mlflow_database: str | None = None
    # where the MLflow server keeps run artifacts and model files: a folder by default, or s3://bucket/prefix
    mlflow_artifacts: str | None = None
    # a Prefect API on another host: workers started by `quorum worker` and `quorum run` use it
    prefect_api_url: str | None = None
    mlflow_tracking_uri: str | None = None
    retrain_cron: str = Field(default="0 3 * * 1", min_length=9)
    monitor_interval_s: int = Field(default=3600, ge=60)
    round_deadline_s: float = Field(default=120.0, gt=0)
    session_start_timeout_s: float = Field(default=180.0, gt=0)
    mlflow_workers: int = Field(default=1, ge=1, le=16)  # MLflow server processes; each imports MLflow on `quorum up`
    # the embedded runner's site worker processes (`quorum run`, and lifecycle runs with runner "local"):
    # they load the site code while the job starts and work side by side; 0 keeps the sites' work in the
    # flow's own process; "auto" uses one per core (at most 4) on a mostly idle machine of 4 cores or more
    site_processes: Annotated[int, Field(ge=0, le=64, strict=True)] | Literal["auto"] = "auto"


class RoutingPolicy(BaseModel):
    """How one site's service splits traffic between the champion and the candidate.

    champion: every request to the champion. shadow: the champion answers, the candidate scores the
    same rows beside it and only counts are kept (rows, agreements). canary: ``canary_percent`` of
    requests are answered by the candidate.
    """

    model_config = _FROZEN

    mode: Literal["champion", "shadow", "canary"] = "champion"
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _percent_fits_mode(self) -> RoutingPolicy:
        if self.mode == "canary" and self.canary_percent == 0:
            raise ValueError("mode canary needs canary_percent > 0 (e.g. 5)")
        if self.mode != "canary" and self.canary_percent:
            raise ValueError(f"canary_percent applies only to mode canary (mode is {self.mode})")
        return self


class ServingConfig(BaseModel):
    """``quorum serve``: the site-local inference service (always on 127.0.0.1)."""

    model_config = _FROZEN

    # the first site's port; each next site (in config order) takes the next one, unless ``ports`` names it
    port: int = Field(default=8610, ge=1024, le=65535)
    ports: dict[str, int] = Field(default_factory=dict)  # per site id: its own loopback port
    # `quorum up` starts each site's `serve-ID` flow run on its pool (`quorum down` stops it)
    start_with_up: bool = False
    # auto: the ONNX variant when the version has one and onnxruntime is installed, else torch
    runtime: Literal["auto", "onnx", "onnx-int8", "torch"] = "auto"
    # how often the service asks the registry whether the champion (or candidate) moved
    poll_interval_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    max_rows: int = Field(default=10_000, ge=1)
    # per site id; a site not listed serves the champion only
    routing: dict[str, RoutingPolicy] = Field(default_factory=dict)

    def policy(self, site_id: str) -> RoutingPolicy:
        return self.routing.get(site_id, RoutingPolicy())


# a sha256 in lowercase hex: key fingerprints, pinned file digests
Fingerprint = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class FederationConfig(BaseModel):
    """The whole federation: its sites, shared schema and every knob of the lifecycle."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    seed: int = 0
    state_dir: Path = Path(".quorum")
    sites: tuple[SiteConfig, ...] = Field(min_length=1)
    features: FeatureConfig
    contract: ContractConfig = ContractConfig()
    contract_file: Path | None = None  # a committed contract YAML (`quorum contract init`), instead of `contract:`
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    gates: GatePolicy = GatePolicy()
    drift: DriftConfig = DriftConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    storage: StorageConfig = StorageConfig()
    placement: PlacementConfig = PlacementConfig()
    serving: ServingConfig = ServingConfig()
    # the sha256 of governance version 1 (the file's bytes): the root a site walks the signed
    # governance chain from; kept here, in git, so no file in the state folder can choose it
    governance_root: Fingerprint | None = None
    source: Path | None = None

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_from_mapping(cls, value: Any) -> Any:
        """Sites are written as a mapping keyed by id (what DVC's ``foreach`` iterates)."""
        if isinstance(value, dict):
            return tuple(
                {"id": key, **(item or {})} if item is None or isinstance(item, dict) else item
                for key, item in value.items()
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        problems = []
        ids = [site.id for site in self.sites]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            problems.append(f"site ids must be distinct: {', '.join(duplicated)}")
        for key, wanted in (
            ("gates.min_sites", self.gates.min_sites),
            ("drift.min_sites_to_retrain", self.drift.min_sites_to_retrain),
        ):
            if wanted > len(self.sites):
                problems.append(f"{key} is {wanted} but only {len(self.sites)} sites are configured")
        if self.training.min_sites > len(self.sites):
            problems.append(
                f"training.min_sites is {self.training.min_sites} but only {len(self.sites)} sites are configured"
            )
        problems.extend(self._training_fits_the_federation())
        feature_set = set(self.features.columns)
        for site in self.sites:
            leaked = feature_set & set(site.pii_columns)
            if leaked:
                problems.append(f"sites.{site.id}: PII columns may not be features: {', '.join(sorted(leaked))}")
            if site.target in feature_set:
                problems.append(f"sites.{site.id}: target {site.target!r} is also listed as a feature")
            for role, column in (("protected_attribute", site.protected_attribute), ("id_column", site.id_column)):
                if column is not None and column in site.pii_columns:
                    problems.append(
                        f"sites.{site.id}: {role} {column!r} is also a PII column (PII is removed before the "
                        f"{'fairness gate' if role == 'protected_attribute' else 'uniqueness check'} sees it)"
                    )
        problems.extend(self._contract_fits_the_features())
        problems.extend(self._placement_fits_the_federation())
        unknown = sorted(set(self.serving.routing) - set(ids))
        if unknown:
            problems.append(f"serving.routing names unknown site(s): {', '.join(unknown)} (sites: {', '.join(ids)})")
        problems.extend(self._serving_ports_fit())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def serving_port(self, site_id: str) -> int:
        """The loopback port of a site's service: ``serving.ports.ID``, else ``serving.port`` plus its index."""
        index = [site.id for site in self.sites].index(site_id)
        return self.serving.ports.get(site_id, self.serving.port + index)

    def _serving_ports_fit(self) -> list[str]:
        """Every site's service has its own port in 1024-65535, apart from the Prefect and MLflow servers."""
        ids = [site.id for site in self.sites]
        unknown = sorted(set(self.serving.ports) - set(ids))
        if unknown:
            return [f"serving.ports names unknown site(s): {', '.join(unknown)} (sites: {', '.join(ids)})"]
        ports = {site_id: self.serving_port(site_id) for site_id in ids}
        problems = [
            f"serving port of site {site_id} is {port}, outside 1024-65535 (set serving.ports.{site_id})"
            for site_id, port in ports.items()
            if not 1024 <= port <= 65535
        ]
        taken = {
            self.deployment.prefect_port: "deployment.prefect_port",
            self.deployment.mlflow_port: "deployment.mlflow_port",
        }
        for site_id, port in ports.items():
            owner = taken.get(port)
            if owner is not None:
                problems.append(f"serving port {port} of site {site_id} is also {owner} (set serving.ports.{site_id})")
            taken[port] = f"the serving port of site {site_id}"
        return problems

    def _contract_fits_the_features(self) -> list[str]:
        """A contract domain may narrow ``features.categorical`` but never contradict it."""
        problems = []
        for column, domain in self.contract.categorical_domains.items():
            shared = self.features.categorical.get(column)
            if shared is None:
                problems.append(f"contract.categorical_domains.{column}: {column!r} is not in features.categorical")
                continue
            extra = [value for value in domain if value not in shared]
            if extra:
                problems.append(
                    f"contract.categorical_domains.{column}: {', '.join(map(repr, extra))} not in "
                    f"features.categorical.{column} ({', '.join(shared)})"
                )
        return problems

    def _placement_fits_the_federation(self) -> list[str]:
        """Enough sites meet ``placement.require`` and the budget pays for at least one round."""
        placement, training = self.placement, self.training
        eligible = [site for site in self.sites if placement.why_not(site) is None]
        problems = []
        if placement.require and len(eligible) < training.min_sites:
            left_out = "; ".join(f"{s.id} {placement.why_not(s)}" for s in self.sites if placement.why_not(s))
            problems.append(
                f"placement.require leaves {len(eligible)} eligible site(s), training.min_sites is "
                f"{training.min_sites}: {left_out}"
            )
        if placement.sampler == "guided":
            if placement.min_share > training.sample_fraction:
                problems.append(
                    f"placement.min_share {placement.min_share:g} exceeds training.sample_fraction "
                    f"{training.sample_fraction:g}: rounds cannot ask every site that often"
                )
            if training.privacy.enabled:
                problems.append(
                    "placement.sampler guided picks sites by their loss and speed, but the privacy accountant "
                    "assumes a random draw: use sampler uniform with privacy"
                )
        if placement.budget is not None and len(eligible) >= training.min_sites:
            cheapest = sorted(site.cost_per_round for site in eligible)[: training.min_sites]
            if sum(cheapest) > placement.budget:
                problems.append(
                    f"placement.budget {placement.budget:g} does not pay for one round: the cheapest "
                    f"{training.min_sites} eligible site(s) (training.min_sites) cost {sum(cheapest):g}"
                )
        return problems

    def _training_fits_the_federation(self) -> list[str]:
        """Training knobs whose validity depends on how many sites and layers there are."""
        training, problems = self.training, []
        per_round = training.sites_per_round(len(self.sites))
        round_size = (
            f"a round asks {per_round} sites (sample_fraction {training.sample_fraction:g} of {len(self.sites)}, "
            f"min_sites {training.min_sites})"
        )
        if training.aggregation in ("krum", "multi_krum") and per_round <= 2 * training.num_byzantine + 2:
            problems.append(
                f"training.aggregation {training.aggregation} with num_byzantine {training.num_byzantine} needs more "
                f"than 2*num_byzantine+2 = {2 * training.num_byzantine + 2} sites per round, but {round_size}"
            )
        if training.aggregation == "multi_krum" and training.multi_krum_m > per_round - training.num_byzantine:
            problems.append(
                f"training.multi_krum_m {training.multi_krum_m} exceeds sites per round minus num_byzantine "
                f"({per_round} - {training.num_byzantine}); {round_size}"
            )
        linear_layers = len(self.model.hidden_sizes) + 1
        if training.freeze_layers >= linear_layers:
            problems.append(
                f"training.freeze_layers {training.freeze_layers} leaves nothing to train: the model has "
                f"{linear_layers} Linear layers (freeze at most {linear_layers - 1})"
            )
        if training.secure_aggregation and training.min_sites < 2:
            problems.append("training.secure_aggregation needs min_sites >= 2: a sum of one update is that update")
        threshold = training.secagg.threshold
        if training.secure_aggregation and isinstance(threshold, int) and threshold > per_round:
            problems.append(f"training.secagg.threshold {threshold} exceeds the sites per round: {round_size}")
        return problems

    def site(self, site_id: str) -> SiteConfig:
        for site in self.sites:
            if site.id == site_id:
                return site
        known = ", ".join(s.id for s in self.sites)
        raise UnknownSite(f"no site {site_id!r} in this federation", fix=f"use one of: {known}")

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(site.id for site in self.sites)

    def config_hash(self) -> str:
        """A stable digest of every knob, recorded in lineage to tell runs apart."""
        payload = self.model_dump(mode="json", exclude={"source"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Approver(BaseModel):
    """One approver and the key that speaks for them.

    ``fingerprint`` pins the key: the sha256 of its DER SubjectPublicKeyInfo, as printed by
    ``quorum keys generate``. The ``public_key`` file may live anywhere (even in a folder others can
    write); a file whose fingerprint differs is refused, so replacing it changes nothing.

    ``expires`` is the first day the key is no longer accepted; ``revoked`` withdraws it at once.
    Both act at verification time, on every signature the key ever made: key-mode signatures
    carry no trusted timestamp, so "signed before it expired" cannot be proven and is not believed.

    Values are never coerced across types (``revoked: "no"`` or ``quorum: yes`` are refused).
    """

    model_config = _FROZEN

    name: StrictStr = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    role: StrictStr = "approver"
    public_key: Path
    fingerprint: Fingerprint
    expires: date | None = None
    revoked: StrictBool = False

    def key_problem(self, today: date) -> str | None:
        """Why this approver's key may not be used on ``today``, or None when it may."""
        if self.revoked:
            return f"key of approver {self.name} is revoked in governance"
        if self.expires is not None and today >= self.expires:
            return f"key of approver {self.name} expired on {self.expires.isoformat()}"
        return None


class CheckpointSigner(BaseModel):
    """The coordinator key that signs checkpoints of the audit log's head, pinned like an approver's."""

    model_config = _FROZEN

    public_key: Path
    fingerprint: Fingerprint


class GovernanceConfig(BaseModel):
    """Who may approve a model, how many distinct approvals promotion needs, and who may roll back.

    ``version`` numbers the governance file: version N+1 is adopted only with the signatures of a
    quorum of version N's approvers (``quorum governance sign`` / ``adopt``), as TUF rotates its root.
    """

    model_config = _FROZEN

    version: StrictInt = Field(default=1, ge=1)
    quorum: StrictInt = Field(ge=1)
    approvers: tuple[Approver, ...] = Field(min_length=1)
    rollback: tuple[StrictStr, ...] | None = None
    checkpoints: CheckpointSigner | None = None
    source: Path | None = None

    @model_validator(mode="after")
    def _quorum_reachable(self) -> GovernanceConfig:
        names = [a.name for a in self.approvers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"approver names must be distinct: {', '.join(dupes)}")
        prints = [a.fingerprint for a in self.approvers]
        shared = sorted({a.name for a in self.approvers if prints.count(a.fingerprint) > 1})
        if shared:
            raise ValueError(f"approvers share one key fingerprint: {', '.join(shared)}; one key approves once")
        if self.quorum > len(self.approvers):
            raise ValueError(f"quorum is {self.quorum} but only {len(self.approvers)} approvers are listed")
        active = [a.name for a in self.approvers if not a.revoked]
        if self.quorum > len(active):
            raise ValueError(
                f"quorum is {self.quorum} but only {len(active)} approvers are not revoked "
                f"({', '.join(active) or 'none'}); add a new approver or lower the quorum"
            )
        unknown = sorted(set(self.rollback or ()) - set(names))
        if unknown:
            raise ValueError(f"rollback names unknown approvers: {', '.join(unknown)} (allowed: {', '.join(names)})")
        return self

    @property
    def rollback_approvers(self) -> tuple[str, ...]:
        """Who may roll the champion back: the ``rollback`` list, or every approver when it is absent."""
        return self.rollback if self.rollback is not None else tuple(a.name for a in self.approvers)

    def approver(self, name: str) -> Approver:
        for approver in self.approvers:
            if approver.name == name:
                return approver
        known = ", ".join(a.name for a in self.approvers)
        raise ConfigError(f"no approver {name!r} in governance", fix=f"use one of: {known}")


def load_federation(path: str | Path) -> FederationConfig:
    """Read, validate and resolve a federation config; every problem is reported at once."""
    source = Path(path).resolve()
    raw = _with_contract_file(_read_yaml(source), source)
    config = _validate(FederationConfig, raw, source)
    base = source.parent
    sites = tuple(_resolve_site(base, site) for site in config.sites)
    training = config.training
    if training.checkpoint is not None:  # existence is checked where it is read: sites load this file too
        training = training.model_copy(update={"checkpoint": _resolve(base, training.checkpoint)})
    return config.model_copy(
        update={
            "sites": sites,
            "state_dir": _resolve(base, config.state_dir),
            "training": training,
            "source": source,
        }
    )


def _with_contract_file(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """Inline the contract a ``contract_file:`` names, validated on its own so errors name that file."""
    named = raw.get("contract_file")
    if named is None:
        return raw
    if "contract" in raw:
        raise ConfigError(
            f"{source} sets both contract and contract_file", fix="keep one: the inline contract or the file"
        )
    path = _resolve(source.parent, Path(str(named)))
    if not path.is_file():
        raise ConfigError(
            f"contract_file {path} (named in {source}) does not exist",
            fix=f"fix the path, or create it with `quorum contract init --site ID --config {source}`",
        )
    contract = _validate(ContractConfig, _read_yaml(path), path)
    return {**raw, "contract_file": str(path), "contract": contract.model_dump(mode="json")}


def _resolve_site(base: Path, site: SiteConfig) -> SiteConfig:
    """A site's root, and its DVC remote when that is a folder rather than a URL, relative to the config."""
    update: dict[str, Any] = {"root": _resolve(base, site.root)}
    if site.dvc_remote is not None and "://" not in site.dvc_remote:
        update["dvc_remote"] = str(_resolve(base, Path(site.dvc_remote)))
    if site.aws_credentials_file is not None:
        update["aws_credentials_file"] = _resolve(base, site.aws_credentials_file)
    return site.model_copy(update=update)


def expand_secrets(value: str, key: str) -> str:
    """``${NAME}`` in a URL from the environment, so a password never has to sit in a committed file."""
    missing = [name for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value) if name not in os.environ]
    if missing:
        raise ConfigError(
            f"{key} names environment variable(s) {', '.join(missing)}, which are not set",
            fix=f"export {missing[0]}=... before running quorum",
        )
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: os.environ[m.group(1)], value)


def load_governance(path: str | Path) -> GovernanceConfig:
    """Read and validate a governance file; key paths are resolved against its folder."""
    source = Path(path).resolve()
    return parse_governance(read_input(source, "governance file", "pass the governance YAML with --governance"), source)


def parse_governance(data: bytes, source: Path) -> GovernanceConfig:
    """Validate governance from the exact bytes a signature covers (``source`` names it and anchors paths)."""
    config = _validate(GovernanceConfig, _parse_yaml(data, source), source)
    approvers = tuple(
        a.model_copy(update={"public_key": _resolve(source.parent, a.public_key)}) for a in config.approvers
    )
    update: dict[str, Any] = {"approvers": approvers, "source": source}
    if config.checkpoints is not None:
        checkpoints = config.checkpoints
        update["checkpoints"] = checkpoints.model_copy(
            update={"public_key": _resolve(source.parent, checkpoints.public_key)}
        )
    return config.model_copy(update=update)


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def read_input(path: Path, what: str, fix: str) -> bytes:
    """The bytes of a file a user named; a missing, unreadable or directory path is a ``ConfigError``."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", fix=fix) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file", fix=fix) from None
    except PermissionError:
        raise ConfigError(f"{what} {path} is not readable (permission denied)", fix=fix) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}", fix=fix) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice instead of keeping the last value.

    A duplicated ``quorum:`` or approver entry silently changing what a file means is exactly what a
    reviewer reading the file would not see.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:
                continue  # an unhashable key is reported by the base constructor
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first on line {first})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML safely and strictly (duplicate keys refused); every config read goes through this."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe


def _read_yaml(source: Path) -> dict[str, Any]:
    return _parse_yaml(read_input(source, "config file", "pass an existing file with --config"), source)


def _parse_yaml(data: bytes, source: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source} is not valid YAML: {exc}", fix="fix the YAML at the position shown (each key once per mapping)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(raw).__name__}", fix="see configs/")
    return raw


def _validate(model: type[M], raw: dict[str, Any], source: Path) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{source} has {exc.error_count()} problem(s):\n" + "\n".join(_describe(e) for e in exc.errors()),
            fix="correct the keys listed above (see the comments in configs/federation.yaml)",
        ) from None


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"    - {key}: unknown key (remove it or check its spelling)"
    if error["type"] == "missing":
        return f"    - {key}: required key is missing"
    allowed = ""
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        allowed = f" (allowed: {ctx['expected']})"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"    - {key} = {shown}: {error['msg']}{allowed}"
