"""Domain exceptions: one base, a short headline each, and the fix a user should try.

Every expected failure a user can cause (bad config, bad data, missing keys, failed gates)
is raised as a ``QuorumError`` subclass and mapped to a message and exit code once, at the
CLI boundary, so no traceback reaches the user for it.
"""

from __future__ import annotations


class QuorumError(Exception):
    """Base of every expected Quorum failure."""

    headline = "Quorum could not finish"
    exit_code = 1

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def render(self) -> str:
        """The text shown to a user: headline, what went wrong, and how to fix it."""
        lines = [f"error: {self.headline}", f"  {self.message}"]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


class ConfigError(QuorumError, ValueError):
    headline = "Invalid configuration"
    exit_code = 2


class UnknownSite(QuorumError, KeyError):
    headline = "Unknown site"
    exit_code = 2

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return self.message


class UnknownModelVersion(QuorumError, LookupError):
    """A command named a registered model or version the tracking store does not hold."""

    headline = "Unknown model version"
    exit_code = 2


class SiteDataError(QuorumError, ValueError):
    headline = "Site data cannot be used"
    exit_code = 3


class ContractFailed(QuorumError):
    headline = "Data contract failed"
    exit_code = 3


class NotEnoughSites(QuorumError):
    headline = "Too few sites took part"
    exit_code = 4


class ReplyRejected(QuorumError, ValueError):
    headline = "Site reply rejected"
    exit_code = 4


class GateFailed(QuorumError):
    headline = "Evaluation gates failed"
    exit_code = 5


class SignatureError(QuorumError):
    headline = "Signature check failed"
    exit_code = 6


class QuorumNotMet(SignatureError):
    headline = "Approval quorum not met"


class ProvenanceError(SignatureError):
    """The provenance statement is missing, malformed, names another model, or disagrees with the files."""

    headline = "Provenance check failed"


class NotPermitted(QuorumError, PermissionError):
    """Governance does not let this approver (or this key) do what was asked."""

    headline = "Not permitted by governance"
    exit_code = 6


class ChampionError(QuorumError):
    """The registry has no champion to act on, or its history does not allow the request."""

    headline = "No suitable champion"
    exit_code = 9


class AuditLogError(QuorumError):
    headline = "Audit log is not intact"
    exit_code = 7


class NotDeployed(QuorumError):
    """Work that goes through a Prefect deployment (retraining on drift) was asked for without a server."""

    headline = "Needs the deployed stack"
    exit_code = 10


class ToolError(QuorumError, RuntimeError):
    """An outside tool (DVC, MLflow, Evidently, Great Expectations) failed."""

    headline = "An outside tool failed"
    exit_code = 8
