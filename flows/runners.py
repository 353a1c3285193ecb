"""Where site work runs: the seam between the round loop and the sites.

``LocalRunner`` (the embedded default) runs each site's work as a Prefect task in a thread pool of
this process; each task still reads only its own site's folder. A runner returns, per site, either
the site's result or the expected failure that kept it out, and never decides what happens next:
that is the coordinator's call (``min_sites``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from configs.errors import QuorumError
from configs.schema import FederationConfig
from evaluation.report import SiteEvaluation
from tasks import site as site_work
from tasks import site_secagg
from tasks.model import Weights
from tasks.site_secagg import MaskedUpdate

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


@dataclass(frozen=True)
class SecAggRound:
    """What a site needs to mask its update in one round: the job (it binds the masks) and every peer's public key."""

    job_id: str
    peers: Mapping[str, bytes]

    def wire_peers(self) -> dict[str, str]:
        return {site_id: key.hex() for site_id, key in sorted(self.peers.items())}


Reply = site_work.SiteUpdate | MaskedUpdate | SiteFailure


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
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Reply]:
        """Each site's update; with ``secagg`` a masked update instead, so no single update is ever seen here."""

    @abstractmethod
    def keys(self, site_ids: Sequence[str], job_id: str) -> dict[str, bytes | SiteFailure]:
        """Each site's secure-aggregation public key for the job (the private key stays at the site)."""

    @abstractmethod
    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        """Each surviving site's pair seeds with the ``dropped`` sites, to unmask the survivors' sum."""

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
    config: FederationConfig, site_id: str, weights: Weights, server_round: int, secagg: SecAggRound | None = None
) -> Reply:
    if secagg is not None:
        return _guarded(
            site_secagg.train_site_masked, site_id, config, site_id, weights, server_round, secagg.job_id, secagg.peers
        )
    return _guarded(site_work.train_site, site_id, config, site_id, weights, server_round)


@task(cache_policy=NO_CACHE, task_run_name="keys-{site_id}")
def site_keys(config: FederationConfig, site_id: str, job_id: str) -> bytes | SiteFailure:
    return _guarded(site_secagg.public_key, site_id, config, site_id, job_id)


@task(cache_policy=NO_CACHE, task_run_name="reveal-{site_id}-round-{server_round}")
def site_reveal(
    config: FederationConfig, site_id: str, secagg: SecAggRound, server_round: int, dropped: tuple[str, ...]
) -> dict[str, bytes] | SiteFailure:
    return _guarded(
        site_secagg.reveal_seeds, site_id, config, site_id, secagg.job_id, server_round, secagg.peers, dropped
    )


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

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        return self._fan_out({s: site_train.submit(self.config, s, weights, server_round, secagg) for s in site_ids})

    def keys(self, site_ids: Sequence[str], job_id: str) -> dict[str, Any]:
        return self._fan_out({s: site_keys.submit(self.config, s, job_id) for s in site_ids})

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, Any]:
        gone = tuple(sorted(dropped))
        return self._fan_out({s: site_reveal.submit(self.config, s, secagg, server_round, gone) for s in site_ids})

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, Any]:
        return self._fan_out({s: site_evaluate.submit(self.config, s, weights) for s in site_ids})

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        return self._fan_out({s: site_monitor.submit(self.config, s, champion) for s in site_ids})
