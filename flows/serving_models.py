"""The models a site's service holds, and how they follow the artifact store.

``ServedModels.refresh`` follows the signed champion statement (and, under a shadow or canary policy,
the candidate pointer, ``quorum.lineage.candidate``). A version is loaded only after
``quorum.lineage.serving_trust.verify_for_serving`` passed on the site's own copy, and the swap is
one reference assignment: a request in flight finishes on the model it started with, and the next
one gets the new model, so no request is dropped. A version that fails verification is refused into
the audit log and the service keeps answering with the last verified model.

Like the site's other flows, the service runs site code only: it reads the statement, the pointer and
the version's files from the artifact store (promotion published them there), never MLflow, so a
site process holds no tracking client and imports no MLflow.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass

from quorum.configs.errors import ChampionError, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.flows.deploy import SiteContext, trust_record
from quorum.lineage.candidate import CandidatePointerError, read_candidate
from quorum.lineage.champion import champion_versions, verified_champion
from quorum.lineage.governance_chain import trusted_governance
from quorum.lineage.serving_trust import Role, VerifiedVersion, verify_for_serving
from quorum.tasks.scoring import Scorer, load_scorer
from quorum.tasks.serving_rows import RowSchema, row_schema, training_fill
from quorum.tasks.site import TRAIN_FILE

logger = logging.getLogger("quorum.serving")
SERVING_DIR = "deployed/serving"


@dataclass(frozen=True)
class LoadedModel:
    verified: VerifiedVersion
    scorer: Scorer
    schema: RowSchema

    @property
    def version(self) -> str:
        return self.verified.version


class ServedModels:
    """One site's verified champion (and candidate), following the artifact store; thread-safe."""

    def __init__(self, ctx: SiteContext, site_id: str, runtime: str | None = None) -> None:
        self.ctx = ctx
        self.site = ctx.config.site(site_id)
        self.serving = ctx.config.serving
        self.policy = self.serving.policy(site_id)
        self.runtime = runtime or self.serving.runtime
        self._models: dict[Role, LoadedModel | None] = {"champion": None, "candidate": None}
        self._refused: dict[tuple[Role, str], str] = {}
        self._stats = {"ok": 0, "refused": 0, "error": 0, "swaps": 0, "verification_refusals": 0}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    @property
    def champion(self) -> LoadedModel | None:
        return self._models["champion"]

    @property
    def candidate(self) -> LoadedModel | None:
        return self._models["candidate"]

    def _candidate_leaving(self) -> None:
        """Called before the candidate changes, outside the lock (the routing counts are archived here)."""

    def _candidate_changed(self) -> None:
        """Called inside the lock, with the swap of the candidate (the routing counts start again here)."""

    # --- following the artifact store ------------------------------------------------------

    def refresh(self) -> None:
        """Load the champion (and candidate, if the policy uses one) when the statement or pointer moved."""
        with self._refresh_lock:
            name = self.ctx.config.model_name
            signed = self._champion_version(name)
            self._follow("champion", signed)
            if self.policy.mode != "champion":
                loaded = self.champion
                champion = signed or (None if loaded is None else loaded.version)
                self._follow_candidate(name, champion, self._former_champions(name))

    def _former_champions(self, name: str) -> tuple[str, ...]:
        """The versions signed champion statements ever named; none known when the statement did not verify."""
        try:
            return champion_versions(self.ctx.store, self._governance(), name)
        except (ChampionError, SignatureError):  # refused (and audited) with the champion itself
            return ()

    def _follow_candidate(self, name: str, champion: str | None, former: tuple[str, ...] = ()) -> None:
        """Follow the candidate pointer; the champion's own version there means no candidate (it was promoted).

        ``champion`` is the version the signed statement names (the loaded one when the statement did not
        verify): a candidate must be newer, which ``verify_for_serving`` checks with the rest. It must also
        be newer than every version in ``former`` (what signed statements named, rollbacks included): a
        rolled-back version is refused, and unloaded if it was serving as the candidate. A malformed
        pointer is refused and the loaded candidate, if any, keeps its share of the traffic.
        """
        try:
            candidate = read_candidate(self.ctx.store, name)
        except CandidatePointerError as error:
            self._refuse("candidate", "pointer", error.message)
            return
        self._refused.pop(("candidate", "pointer"), None)
        if candidate == champion:
            candidate = None
        newest = max((int(version) for version in former if version.isdigit()), default=0)
        newer_than_champion = champion is None or not champion.isdigit() or int(candidate or 0) > int(champion)
        if candidate is not None and newer_than_champion and int(candidate) <= newest:
            self._refuse(
                "candidate",
                candidate,
                f"candidate {name} v{candidate} is not newer than v{newest}, the newest version a signed champion "
                "statement named: it was rolled back or superseded",
            )
            candidate = None  # and a candidate loaded before the rollback stops taking traffic
        self._follow("candidate", candidate, champion)

    def _governance(self) -> GovernanceConfig:
        """Governance as this site accepts it: chained by signatures from the version it accepted before."""
        source = self.ctx.governance.source
        if source is None:
            return self.ctx.governance
        return trusted_governance(source, trust_record(self.site), self.ctx.config.governance_root)

    def _champion_version(self, name: str) -> str | None:
        """The version the signed champion statement names, never the registry alias; ``None`` (keep
        serving what is loaded) when the statement is missing, unsigned or older than one seen before."""
        try:
            return verified_champion(self.ctx.store, self._governance(), name, trust_record(self.site)).version
        except ChampionError:  # nothing promoted yet: nothing to refuse
            return None
        except SignatureError as error:
            self._refuse("champion", "statement", error.message)
            return None

    def champion_refusal(self) -> tuple[str, str] | None:
        """``(version, reason)`` of the newest champion refusal (version ``statement``: the statement itself)."""
        refused = [(version, reason) for (role, version), reason in self._refused.items() if role == "champion"]
        return refused[-1] if refused else None

    def _follow(self, role: Role, version: str | None, champion: str | None = None) -> None:
        current = self._models[role]
        if version is None:
            if role == "candidate" and current is not None:
                self._swap(role, None)
            return
        if current is not None and current.version == version:
            return
        try:
            loaded = self._load(role, version, champion)
        except SignatureError as error:
            self._refuse(role, version, error.message)
            return
        self._swap(role, loaded)
        self._refused.pop((role, version), None)
        self.ctx.audit.append(
            "serving_loaded",
            f"site:{self.site.id}",
            {
                "model": loaded.verified.model,
                "version": version,
                "role": role,
                "site": self.site.id,
                "runtime": loaded.scorer.runtime,
                "provenance_sha256": loaded.verified.provenance_sha256,
                "previous": None if current is None else current.version,
            },
        )
        logger.info(
            "%s serves %s v%s as %s (%s)", self.site.id, loaded.verified.model, version, role, loaded.scorer.runtime
        )

    def _load(self, role: Role, version: str, champion: str | None) -> LoadedModel:
        """Verify the version's files from the artifact store on the site's own copy, then load them.

        Nothing is fetched from MLflow: files missing from the store are a refusal (``SignatureError``,
        naming what is missing and to run the promote stage again), like files that do not verify.
        """
        name = self.ctx.config.model_name
        destination = self.site.root / SERVING_DIR / f"{role}-v{version}"
        verified = verify_for_serving(
            self.ctx.store, self._governance(), name, version, destination, role, trust_record(self.site), champion
        )
        scorer = load_scorer(verified.files, self.runtime, self.ctx.config.model.hidden_sizes)
        fill = training_fill(self.site.processed_dir / TRAIN_FILE, self.ctx.config.features, scorer.feature_mean)
        return LoadedModel(verified, scorer, row_schema(self.ctx.config.features, self.site, fill))

    def _swap(self, role: Role, loaded: LoadedModel | None) -> None:
        if role == "candidate":
            self._candidate_leaving()  # the counts belong to the candidate they measured
        with self._lock:
            previous = self._models[role]
            self._models[role] = loaded  # one reference: requests in flight keep the model they read
            self._stats["swaps"] += previous is not None and loaded is not None
            if role == "candidate":
                self._candidate_changed()
        if previous is not None and (loaded is None or previous.verified.files != loaded.verified.files):
            shutil.rmtree(previous.verified.files.parent, ignore_errors=True)

    def refusal(self, role: Role, version: str) -> str | None:
        """Why ``version`` was refused for ``role`` at the last attempt, if it was."""
        return self._refused.get((role, version))

    def _refuse(self, role: Role, version: str, reason: str) -> None:
        """Audit a refusal once per version and reason; the loaded model keeps serving."""
        if self._refused.get((role, version)) == reason:
            return
        self._refused[(role, version)] = reason
        with self._lock:
            self._stats["verification_refusals"] += 1
        kept = self._models[role]
        self.ctx.audit.append(
            "serving_refused",
            f"site:{self.site.id}",
            {
                "model": self.ctx.config.model_name,
                "version": version,
                "role": role,
                "site": self.site.id,
                "reason": reason,
                "kept": None if kept is None else kept.version,
            },
        )
        logger.warning("%s refused %s v%s: it did not verify", self.site.id, role, version)
