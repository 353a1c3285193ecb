"""The artifact store on S3 or an S3-compatible service (MinIO, Ceph, moto), for sites on other machines.

Each object's metadata holds the sha256 of its body, written in the same atomic request (a PUT or a
completed multipart upload), so a reader can tell a damaged or replaced body. Credentials come only
from boto3's chain in the running process: each site's worker holds its own, never Quorum's config.
An endpoint that drops out for seconds must not fail a round, so transient failures are retried
(botocore, then backoff with jitter until ``retry_deadline_s``); refusals are not: waiting won't help.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

from quorum.configs.errors import ConfigError
from quorum.lineage.s3_errors import (
    MISSING_KEY_CODES,
    BucketMissing,
    StoreAccessDenied,
    StoreUrlInvalid,
    error_code,
    is_key,
    is_transient,
    parse_s3_url,
    refusal,
)
from quorum.lineage.store_base import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    StoreUnavailable,
    check_key,
    file_sha256,
    sha256_bytes,
)

__all__ = ["BucketMissing", "S3ArtifactStore", "StoreAccessDenied", "StoreUrlInvalid", "parse_s3_url"]

T = TypeVar("T")

_MIB = 1 << 20
_MIN_PART_MB = 5  # S3's smallest multipart part
_DIGEST_META = "sha256"
_READS_BEFORE_CORRUPT = 3  # a read cut short, or racing an overwrite, gets two more chances
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 8.0
_INDEX_NAME = ".quorum-s3-index.json"
_CORRUPT_FIX = "the object was damaged or replaced outside Quorum; re-run the step that wrote it"


class S3ArtifactStore(ArtifactStore):
    """Artifacts under ``s3://bucket/prefix``; ``checkout`` mirrors into ``cache/<prefix>``, one cache per store."""

    poll_s = 0.2

    def __init__(
        self,
        url: str,
        *,
        cache: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold_mb: int = 64,
        retry_deadline_s: float = 120.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        if multipart_threshold_mb < _MIN_PART_MB:
            raise ConfigError(
                f"multipart_threshold_mb={multipart_threshold_mb} is below S3's smallest part ({_MIN_PART_MB} MB)",
                fix=f"use {_MIN_PART_MB} or more",
            )
        if retry_deadline_s <= 0:
            raise ConfigError(f"retry_deadline_s={retry_deadline_s} must be positive", fix="use e.g. 120")
        self.location = url
        self.cache = cache
        self.endpoint_url = endpoint_url
        self.region = region
        self.multipart_threshold_mb = multipart_threshold_mb
        self.retry_deadline_s = retry_deadline_s
        self._s3: Any = None  # made on first use: importing or pickling the store needs no boto3
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """A task may ship the store to another process; the client and its connections stay behind."""
        return {name: value for name, value in self.__dict__.items() if name not in ("_s3", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _s3=None, _lock=threading.Lock())

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        metadata = {_DIGEST_META: digest}
        self._retrying(
            f"write {self._url(key)}",
            lambda: self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata=metadata),
        )
        return digest

    def put_file(self, key: str, source: Path) -> str:
        """Hashed in a streaming pass first: the digest has to travel with the upload's first request."""
        from boto3.s3.transfer import TransferConfig

        digest = file_sha256(source)
        part_bytes = self.multipart_threshold_mb * _MIB
        transfer = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=4,
            preferred_transfer_client="classic",  # the CRT client would bypass our timeouts and retry policy
        )
        extra = {"Metadata": {_DIGEST_META: digest}}
        self._retrying(
            f"upload {source} to {self._url(key)}",
            lambda: self._client().upload_file(
                str(source), self.bucket, self._key(key), ExtraArgs=extra, Config=transfer
            ),
        )
        return digest

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        def read() -> tuple[bytes, str, str | None]:
            body, recorded = self._get(key)
            with closing(body):
                data = bytes(body.read())
            return data, sha256_bytes(data), recorded

        return self._verified(key, read, expected_sha256)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self._client().head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if error_code(exc) in MISSING_KEY_CODES:
                    return False
                raise
            return True

        return self._retrying(f"look up {self._url(key)}", head)

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._list(prefix))

    def checkout(self, prefix: str) -> Path:
        """Fetch only what changed since the last checkout, remotely (listing) or locally (size, mtime)."""
        folder = self.cache / check_key(prefix)
        folder.mkdir(parents=True, exist_ok=True)
        remote = self._list(prefix)
        index = self._load_index()
        for key, version in list(remote.items()):
            path = self.cache / key
            if (state := _local_state(version, path)) is not None and index.get(key) == state:
                continue
            try:
                self._download(key, path)
            except ArtifactMissing:  # deleted since the listing: the mirror must not have it either
                del remote[key]
                continue
            index[key] = _local_state(version, path)
        for path in sorted(folder.rglob("*"), reverse=True):  # children before their folders
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif (relative := path.relative_to(self.cache).as_posix()) not in remote:
                path.unlink()
                index.pop(relative, None)
        self._save_index(index)
        return folder

    def ensure_bucket(self) -> None:
        """Create the bucket if missing, for dev and test endpoints (``quorum up`` with moto or MinIO).

        Production buckets are the operator's, made once with encryption, versioning, an access policy
        and a lifecycle rule aborting abandoned multipart uploads - none of which this sets.
        """
        from botocore.exceptions import ClientError

        def create() -> None:
            client = self._client()
            try:  # a site's credentials may read the bucket without the right to create one
                client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            region = self.region or client.meta.region_name
            extra: dict[str, Any] = {}
            if region and region != "us-east-1":  # us-east-1 rejects an explicit location constraint
                extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                client.create_bucket(Bucket=self.bucket, **extra)
            except ClientError as exc:
                if error_code(exc) != "BucketAlreadyOwnedByYou":  # a concurrent `quorum up` got there first
                    raise

        self._retrying(f"create bucket {self.bucket}", create)

    def _client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                options: dict[str, Any] = {
                    "connect_timeout": 5,  # a dead endpoint is noticed in seconds, then retried
                    "read_timeout": 30,
                    "retries": {"mode": "standard", "max_attempts": 3},
                    "max_pool_connections": 16,
                }
                if self.endpoint_url:  # MinIO, Ceph and moto: path-style URLs, no optional checksum headers
                    options["s3"] = {"addressing_style": "path"}
                    options["request_checksum_calculation"] = "when_required"
                    options["response_checksum_validation"] = "when_required"
                session = boto3.session.Session(region_name=self.region)  # not boto3's shared default session
                self._s3 = session.client("s3", endpoint_url=self.endpoint_url, config=Config(**options))
            return self._s3

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _endpoint(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        """Run ``action`` until it succeeds, is refused, or transient failures outlast the deadline."""
        deadline = time.monotonic() + self.retry_deadline_s
        backoff_s = _BACKOFF_FIRST_S
        while True:
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    domain_error = refusal(
                        exc, what=what, bucket=self.bucket, endpoint=self._endpoint(), location=self.location
                    )
                    if domain_error is None:
                        raise
                    raise domain_error from exc
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise StoreUnavailable(
                        f"could not {what}: {self._endpoint()} kept failing for {self.retry_deadline_s:g} s "
                        f"(last error: {exc})",
                        fix="check that the S3 endpoint is up and reachable from this machine "
                        "(endpoint URL, network, firewall, proxy), then re-run",
                    ) from exc
                time.sleep(min(remaining_s, backoff_s / 2 + random.uniform(0, backoff_s / 2)))
                backoff_s = min(2 * backoff_s, _BACKOFF_MAX_S)

    def _get(self, key: str) -> tuple[Any, str | None]:
        """The body stream of ``key`` and the digest recorded with it, from one response."""
        from botocore.exceptions import ClientError

        try:
            response = self._client().get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if error_code(exc) in MISSING_KEY_CODES:
                raise ArtifactMissing(
                    f"no object {self._url(key)} at {self._endpoint()}",
                    fix="check the job id and the store URL, or re-run the step that writes it",
                ) from exc
            raise
        return response["Body"], response.get("Metadata", {}).get(_DIGEST_META)

    def _verified(self, key: str, read: Callable[[], tuple[T, str, str | None]], expected: str | None) -> T:
        """Re-read a body that fails its digest before calling it corrupt: the failure may be a cut read."""
        problem = ""
        for _ in range(_READS_BEFORE_CORRUPT):
            result, actual, recorded = self._retrying(f"read {self._url(key)}", read)
            if not (problem := _digest_problem(actual, recorded, expected)):
                return result
        raise ArtifactCorrupt(f"{self._url(key)}: {problem} ({_READS_BEFORE_CORRUPT} reads)", fix=_CORRUPT_FIX)

    def _download(self, key: str, path: Path) -> None:
        """Stream into a temporary sibling, hashing on the way; only a verified file is renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")

        def fetch() -> tuple[None, str, str | None]:
            digest = hashlib.sha256()
            body, recorded = self._get(key)
            with closing(body), open(partial, "wb") as handle:
                for chunk in body.iter_chunks(_MIB):
                    digest.update(chunk)
                    handle.write(chunk)
            return None, digest.hexdigest(), recorded

        try:
            self._verified(key, fetch, None)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    def _list(self, prefix: str) -> dict[str, str]:
        """Key (relative to the store's prefix) -> version (ETag, size, time: changes on every rewrite)."""
        folder = self._key(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0

        def page_through() -> dict[str, str]:
            listed = {}
            for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                for item in page.get("Contents", []):
                    key = str(item["Key"])[skip:]
                    if key.endswith("/"):  # a console "folder" marker, not an artifact
                        continue
                    if not is_key(key):  # it would land outside the checkout folder
                        raise ArtifactCorrupt(
                            f"s3://{self.bucket}/{item['Key']} has a key that is not a plain relative path",
                            fix="remove or rename that object; Quorum never writes such keys",
                        )
                    listed[key] = f"{item['ETag']} {item['Size']} {item['LastModified'].isoformat()}"
            return listed

        return self._retrying(f"list {self._url(prefix)}/", page_through)

    def _load_index(self) -> dict[str, list[object] | None]:
        """Which remote version each cached file came from. A lost or unreadable index only costs downloads."""
        try:
            index = json.loads((self.cache / _INDEX_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def _save_index(self, index: dict[str, list[object] | None]) -> None:
        partial = self.cache / f"{_INDEX_NAME}.{uuid.uuid4().hex[:8]}.part"
        partial.write_text(json.dumps(index, indent=1, sort_keys=True))
        partial.replace(self.cache / _INDEX_NAME)


def _local_state(version: str, path: Path) -> list[object] | None:
    """The remote version plus the local file's size and mtime, so a file edited in the cache is fetched again."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [version, stat.st_size, stat.st_mtime_ns]


def _digest_problem(actual: str, recorded: str | None, expected: str | None) -> str:
    """Objects written by other tools have no recorded digest; they are checked against ``expected`` only."""
    if recorded is not None and actual != recorded:
        return f"body sha256 {actual[:16]}… differs from the {recorded[:16]}… recorded when it was written"
    if expected is not None and actual != expected:
        return f"body sha256 {actual[:16]}… differs from the expected {expected[:16]}…"
    return ""
