"""Where site work runs: the seam between the round loop and the sites.

``LocalRunner`` (the embedded default) runs the sites' work as Prefect tasks of this process, in it or
in its site worker processes; each site still reads only its own folder. A runner returns, per site,
either the site's result or the expected failure that kept it out, and never decides what happens
next: that is the coordinator's call (``min_sites``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from quorum.configs.schema import FederationConfig
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import SiteEvaluation
from quorum.flows.runners.site_workers import SiteFailure as SiteFailure  # re-exported: the runners speak it
from quorum.flows.runners.site_workers import SiteWorkers, guarded
from quorum.tasks import site as site_work
from quorum.tasks import site_secagg
from quorum.tasks.site_secagg import MaskedUpdate
from quorum.tasks.weights import Weights

T = TypeVar("T")


@dataclass(frozen=True)
class SecAggRound:
    """What the sites of a round need for the next SecAgg+ step: the job (it binds the masks), every
    site's advertised round keys, the sites that did not share their keys (nobody masks with them),
    and, to unmask, the encrypted shares addressed to each site (recipient -> sender -> ciphertext)."""

    job_id: str
    peers: Mapping[str, bytes]
    unshared: tuple[str, ...] = ()
    shares: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)

    def wire_peers(self) -> dict[str, str]:
        return {site_id: key.hex() for site_id, key in sorted(self.peers.items())}

    def wire_shares(self) -> dict[str, dict[str, str]]:
        return {to: {sender: c.hex() for sender, c in sorted(by.items())} for to, by in sorted(self.shares.items())}


Reply = site_work.SiteUpdate | MaskedUpdate | SiteFailure


class SiteRunner(ABC):
    """Runs one kind of site work at many sites and returns each site's result or its failure."""

    def start(self, site_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Prepare the sites for a job (the pool runner starts their sessions here)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the sites at the end of a job."""

    def rest(self) -> None:  # noqa: B027 - optional hook
        """Release what can be started again while the job waits (for approvals, possibly for days)."""

    @abstractmethod
    def preprocess(self, site_ids: Sequence[str]) -> dict[str, site_work.DataFingerprint | SiteFailure]: ...

    @abstractmethod
    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Reply]:
        """Each site's update; with ``secagg`` a masked update instead, so no single update is ever seen here."""

    @abstractmethod
    def keys(self, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, bytes | SiteFailure]:
        """Each site's secure-aggregation public keys for the round (the secrets stay at the site)."""

    @abstractmethod
    def share(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        """Each site's encrypted Shamir shares of its secrets, by recipient (its neighbourhood)."""

    @abstractmethod
    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        """Each surviving site's shares, by owner: of the self-mask seed of a survivor, of the mask key of a
        site in ``dropped``; the shares the sites sent each other are in ``secagg.shares``."""

    @abstractmethod
    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]: ...

    @abstractmethod
    def compare_variants(
        self, site_ids: Sequence[str], weights: Weights, variants: Mapping[str, bytes]
    ) -> dict[str, dict[str, BinaryCounts] | SiteFailure]:
        """Each site's test-split counts under torch (``weights``) and under each ONNX variant (runtime -> the
        graph's bytes); the bytes are those a promotion signs, so the comparison is about the files served."""

    @abstractmethod
    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]: ...


def _at_each_site(
    work: Callable[..., T], config: FederationConfig, site_ids: Sequence[str], *args: Any
) -> dict[str, T | SiteFailure]:
    """``work(config, site_id, *args)`` at one site after the other; one site's expected failure stays its own.

    On one torch thread: the sites share this process's cores, and the small models they train run
    fastest without a thread pool to wake for every batch.
    """
    from quorum.tasks.training import torch_threads  # torch loads when the first round trains

    with torch_threads(1):
        return {site_id: guarded(work, site_id, config, site_id, *args) for site_id in site_ids}


def _on_workers(
    workers: SiteWorkers | None,
    work: Callable[..., T],
    config: FederationConfig,
    site_ids: Sequence[str],
    *args: Any,
) -> dict[str, T | SiteFailure]:
    """``_at_each_site``, or the same calls side by side in the site worker processes when there are some."""
    if workers is None:
        return _at_each_site(work, config, site_ids, *args)
    return workers.run_each(work, site_ids, lambda site_id: (config, site_id, *args))


@task(cache_policy=NO_CACHE, task_run_name="train-round-{server_round}")
def train_at_sites(
    config: FederationConfig,
    site_ids: Sequence[str],
    weights: Weights,
    server_round: int,
    secagg: SecAggRound | None = None,
    workers: SiteWorkers | None = None,
) -> dict[str, Any]:
    if secagg is not None:
        masked = site_secagg.train_site_masked
        job_id, peers, unshared = secagg.job_id, dict(secagg.peers), secagg.unshared
        return _on_workers(workers, masked, config, site_ids, weights, server_round, job_id, peers, unshared)
    return _on_workers(workers, site_work.train_site, config, site_ids, weights, server_round)


@task(cache_policy=NO_CACHE, task_run_name="secagg-keys-round-{server_round}")
def keys_at_sites(config: FederationConfig, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, Any]:
    return _at_each_site(site_secagg.round_keys, config, site_ids, job_id, server_round)


@task(cache_policy=NO_CACHE, task_run_name="secagg-share-round-{server_round}")
def share_at_sites(
    config: FederationConfig, site_ids: Sequence[str], secagg: SecAggRound, server_round: int
) -> dict[str, Any]:
    return _at_each_site(site_secagg.share_keys, config, site_ids, secagg.job_id, server_round, secagg.peers)


def _reveal_at(
    config: FederationConfig, site_id: str, secagg: SecAggRound, server_round: int, dropped: tuple[str, ...]
) -> dict[str, bytes]:
    mine = secagg.shares.get(site_id, {})
    return site_secagg.reveal_shares(config, site_id, secagg.job_id, server_round, secagg.peers, dropped, mine)


@task(cache_policy=NO_CACHE, task_run_name="reveal-round-{server_round}")
def reveal_at_sites(
    config: FederationConfig,
    site_ids: Sequence[str],
    secagg: SecAggRound,
    server_round: int,
    dropped: tuple[str, ...],
) -> dict[str, Any]:
    return _at_each_site(_reveal_at, config, site_ids, secagg, server_round, dropped)


@task(cache_policy=NO_CACHE)
def evaluate_at_sites(
    config: FederationConfig, site_ids: Sequence[str], weights: Weights, workers: SiteWorkers | None = None
) -> dict[str, Any]:
    return _on_workers(workers, site_work.evaluate_site, config, site_ids, weights)


def _at_site(workers: SiteWorkers | None, work: Callable[..., T], site_id: str, *args: Any) -> T | SiteFailure:
    return guarded(work, site_id, *args) if workers is None else workers.run_one(work, site_id, *args)


@task(cache_policy=NO_CACHE)
def compare_variants_at_sites(
    config: FederationConfig,
    site_ids: Sequence[str],
    weights: Weights,
    variants: Mapping[str, bytes],
    workers: SiteWorkers | None = None,
) -> dict[str, Any]:
    from quorum.tasks.variants import compare_site  # ONNX Runtime loads only when a promotion compares

    return _on_workers(workers, compare_site, config, site_ids, weights, dict(variants))


@task(cache_policy=NO_CACHE, task_run_name="preprocess-{site_id}")
def site_preprocess(
    config: FederationConfig, site_id: str, workers: SiteWorkers | None = None
) -> site_work.DataFingerprint | SiteFailure:
    return _at_site(workers, site_work.preprocess_site, site_id, config, site_id)


@task(cache_policy=NO_CACHE, task_run_name="monitor-{site_id}")
def site_monitor(
    config: FederationConfig, site_id: str, champion: Weights | None, workers: SiteWorkers | None = None
) -> Any:
    return _at_site(workers, site_work.monitor_site, site_id, config, site_id, champion)


class LocalRunner(SiteRunner):
    """All sites in this process, as Prefect tasks of the calling flow.

    Training, evaluation and the secure-aggregation keys and seeds are compute on data already loaded:
    each is one task that visits the sites in turn. A task per site would cost every site its own
    task-run state changes on the Prefect API, and sites run side by side in threads fight over the
    interpreter lock on a few cores (small-batch training is mostly Python), so in turn is sooner.
    Preprocessing and monitoring read raw files and write reports, and a site mostly waits on its files:
    there each site is a task of its own, all running side by side. A site's own training time is in
    its reply (``SiteUpdate.train_s``).

    With ``workers`` (``SiteWorkers``), preprocessing, training, evaluation and monitoring run in those
    processes instead, side by side on the machine's cores; the tasks and their results are the same.
    The secure-aggregation key steps are light and stay here.
    """

    def __init__(self, config: FederationConfig, workers: SiteWorkers | None = None) -> None:
        self.config = config
        self.workers = workers

    def rest(self) -> None:
        if self.workers is not None:
            self.workers.rest()

    def _quoted_workers(self) -> quote | None:
        return None if self.workers is None else quote(self.workers)

    def _quoted_config(self) -> quote:
        """The config as a task argument Prefect passes on untouched: it would otherwise walk every field
        at every task call, looking for results of upstream tasks to wait on, and a config holds none."""
        return quote(self.config)

    def _in_turn(self, step: Task[..., dict[str, Any]], site_ids: Sequence[str], *args: Any) -> dict[str, Any]:
        return step(self._quoted_config(), list(site_ids), *args)

    def _side_by_side(self, step: Task[..., Any], site_ids: Sequence[str], *args: Any) -> dict[str, Any]:
        futures = {site_id: step.submit(self._quoted_config(), site_id, *args) for site_id in site_ids}
        return {site_id: future.result() for site_id, future in futures.items()}

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, Any]:
        return self._side_by_side(site_preprocess, site_ids, self._quoted_workers())

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        return self._in_turn(train_at_sites, site_ids, weights, server_round, secagg, self._quoted_workers())

    def keys(self, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, Any]:
        return self._in_turn(keys_at_sites, site_ids, job_id, server_round)

    def share(self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int) -> dict[str, Any]:
        return self._in_turn(share_at_sites, site_ids, secagg, server_round)

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, Any]:
        return self._in_turn(reveal_at_sites, site_ids, secagg, server_round, tuple(sorted(dropped)))

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, Any]:
        return self._in_turn(evaluate_at_sites, site_ids, weights, self._quoted_workers())

    def compare_variants(
        self, site_ids: Sequence[str], weights: Weights, variants: Mapping[str, bytes]
    ) -> dict[str, Any]:
        files = quote(dict(variants))
        return self._in_turn(compare_variants_at_sites, site_ids, weights, files, self._quoted_workers())

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        return self._side_by_side(site_monitor, site_ids, champion, self._quoted_workers())
