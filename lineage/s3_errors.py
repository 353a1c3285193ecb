"""What an S3 failure means for the artifact store: wait and retry, or tell the user what to fix.

Kept apart from the store so the decision - which failures are worth waiting out, and which domain
error each refusal becomes - reads in one place and can be tested without an endpoint. botocore is
imported inside the functions, never at module import, so importing the store stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from quorum.configs.errors import ConfigError, QuorumError, ToolError
from quorum.lineage.store_base import check_key

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "InternalError",
     "ServiceUnavailable"}
)  # fmt: skip
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)  # fmt: skip
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class StoreUrlInvalid(ConfigError):
    headline = "Invalid artifact store URL"


class StoreAccessDenied(QuorumError, PermissionError):
    headline = "Artifact store refused access"
    exit_code = 2


class BucketMissing(QuorumError, LookupError):
    headline = "Artifact bucket does not exist"
    exit_code = 2


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/optional/prefix`` -> (bucket, prefix), checked so a typo fails at start-up, not mid-round."""
    fix = "write the store as s3://<bucket> or s3://<bucket>/<prefix>, e.g. s3://quorum-artifacts/jobs"
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise StoreUrlInvalid(f"artifact store URL {url!r} does not start with s3://", fix=fix)
    if not _BUCKET_NAME.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise StoreUrlInvalid(
            f"{parts.netloc!r} in {url!r} is not an S3 bucket name (3-63 characters: lowercase letters, "
            "digits, '.' and '-'; credentials and ports do not belong in the URL)",
            fix=fix,
        )
    prefix = parts.path.strip("/")
    if parts.query or parts.fragment or (prefix and not is_key(prefix)):
        raise StoreUrlInvalid(f"the prefix of {url!r} is not a plain relative path", fix=fix)
    return parts.netloc, prefix


def is_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def error_code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``SlowDown``, ``404`` for a HEAD)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_transient(exc: BaseException) -> bool:
    """Failures that waiting can fix: no connection, a timeout, a cut stream, 5xx, 429 or throttling."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    transient = (HTTPClientError, BotoConnectionError, IncompleteReadError, ConnectionError, TimeoutError)
    for err in _causes(exc):
        if isinstance(err, QuorumError):  # already decided (StoreUnavailable is a ConnectionError too)
            return False
        if isinstance(err, transient):
            return True
        if isinstance(err, ClientError):
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            return status >= 500 or status == 429 or error_code(err) in _TRANSIENT_CODES
    return False


def refusal(exc: BaseException, *, what: str, bucket: str, endpoint: str, location: str) -> QuorumError | None:
    """The domain error for an answer that retrying cannot change; None to let ``exc`` through as it is."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    for err in _causes(exc):
        if isinstance(err, QuorumError):
            return None
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return StoreAccessDenied(
                f"no usable AWS credentials to {what} ({err})",
                fix="at a site, set sites.<id>.aws_credentials_file in the federation config to the site's own "
                "credentials file; for the coordinator, export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) before `quorum up` / `quorum run`",
            )
        if isinstance(err, ClientError):
            code = error_code(err)
            if code == "NoSuchBucket":
                return BucketMissing(
                    f"bucket {bucket!r} does not exist at {endpoint} (trying to {what})",
                    fix=f"check the store URL {location}; create the bucket (on a dev endpoint such as "
                    "MinIO, `quorum up` creates it)",
                )
            if code in _DENIED_CODES:
                return StoreAccessDenied(
                    f"{endpoint} refused to {what}: {code}",
                    fix="check this site's AWS credentials and that its policy allows s3:GetObject, "
                    f"s3:PutObject and s3:ListBucket on bucket {bucket!r}",
                )
            return ToolError(f"S3 refused to {what}: {err}", fix="check the store URL and the endpoint's logs")
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: boto3's transfer manager re-raises a ClientError inside its own."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
