"""Where site work runs: the seam between the round loop and the sites.

``LocalRunner`` (the embedded default) runs each site's work as a Prefect task in a thread pool of
this process; each task still reads only its own site's folder. A runner returns, per site, either
the site's result or the expected failure that kept it out, and never decides what happens next:
that is the coordinator's call (``min_sites``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from configs.errors import QuorumError
from configs.schema import FederationConfig
from evaluation.report import SiteEvaluation
from tasks import site as site_work
from tasks.model import Weights

T = TypeVar("T")


@dataclass(frozen=True)
class SiteFailure:
    """An expected failure at one site (bad data, missing file): the site is left out, the job decides."""

    site_id: str
    headline: str
    message: str
    fix: str

    @classmethod
    def of(cls, site_id: str, error: QuorumError) -> SiteFailure:
        return cls(site_id, error.headline, error.message, error.fix)

    def describe(self) -> str:
        return f"{self.site_id}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


class SiteRunner(ABC):
    """Runs one kind of site work at many sites and returns each site's result or its failure."""

    def start(self, site_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Prepare the sites for a job (the pool runner starts their sessions here)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the sites at the end of a job."""

    @abstractmethod
    def preprocess(self, site_ids: Sequence[str]) -> dict[str, site_work.DataFingerprint | SiteFailure]: ...

    @abstractmethod
    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int
    ) -> dict[str, site_work.SiteUpdate | SiteFailure]: ...

    @abstractmethod
    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]: ...

    @abstractmethod
    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]: ...


def _guarded(work: Callable[..., T], site_id: str, *args: Any) -> T | SiteFailure:
    try:
        return work(*args)
    except QuorumError as error:
        return SiteFailure.of(site_id, error)


@task(cache_policy=NO_CACHE, task_run_name="preprocess-{site_id}")
def site_preprocess(config: FederationConfig, site_id: str) -> site_work.DataFingerprint | SiteFailure:
    return _guarded(site_work.preprocess_site, site_id, config, site_id)


@task(cache_policy=NO_CACHE, task_run_name="train-{site_id}-round-{server_round}")
def site_train(
    config: FederationConfig, site_id: str, weights: Weights, server_round: int
) -> site_work.SiteUpdate | SiteFailure:
    return _guarded(site_work.train_site, site_id, config, site_id, weights, server_round)


@task(cache_policy=NO_CACHE, task_run_name="evaluate-{site_id}")
def site_evaluate(config: FederationConfig, site_id: str, weights: Weights) -> SiteEvaluation | SiteFailure:
    return _guarded(site_work.evaluate_site, site_id, config, site_id, weights)


@task(cache_policy=NO_CACHE, task_run_name="monitor-{site_id}")
def site_monitor(config: FederationConfig, site_id: str, champion: Weights | None) -> Any:
    return _guarded(site_work.monitor_site, site_id, config, site_id, champion)


class LocalRunner(SiteRunner):
    """All sites in this process, as concurrent Prefect tasks of the calling flow."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config

    def _fan_out(self, futures: dict[str, PrefectFuture[Any]]) -> dict[str, Any]:
        return {site_id: future.result() for site_id, future in futures.items()}

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, Any]:
        return self._fan_out({s: site_preprocess.submit(self.config, s) for s in site_ids})

    def train(self, site_ids: Sequence[str], weights: Weights, server_round: int) -> dict[str, Any]:
        return self._fan_out({s: site_train.submit(self.config, s, weights, server_round) for s in site_ids})

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, Any]:
        return self._fan_out({s: site_evaluate.submit(self.config, s, weights) for s in site_ids})

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        return self._fan_out({s: site_monitor.submit(self.config, s, champion) for s in site_ids})
