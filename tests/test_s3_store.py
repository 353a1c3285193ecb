"""S3ArtifactStore against a real S3 server (moto, in its own process), with no mocks of boto3.

Outages go through FlakyProxy, which resets every connection to the server for a while.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quorum.configs.errors import ConfigError
from quorum.lineage.artifacts import ArtifactCorrupt, ArtifactMissing, StoreUnavailable
from quorum.lineage.s3_errors import is_transient
from quorum.lineage.s3_store import BucketMissing, S3ArtifactStore, StoreAccessDenied, StoreUrlInvalid
from tests.s3_server import FlakyProxy, bucket, flaky_proxy, moto_server, raw_client, s3_endpoint

__all__ = ["bucket", "flaky_proxy", "s3_endpoint"]  # fixtures, imported for pytest to find

REPO = Path(__file__).resolve().parent.parent


def make_store(endpoint: str, bucket: str, cache: Path, prefix: str = "", **options: object) -> S3ArtifactStore:
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return S3ArtifactStore(url, cache=cache, endpoint_url=endpoint, **options)  # type: ignore[arg-type]


@pytest.fixture
def store(s3_endpoint: str, bucket: str, tmp_path: Path) -> S3ArtifactStore:
    return make_store(s3_endpoint, bucket, tmp_path / "cache", prefix="jobs/7")


def test_bytes_json_and_weights_round_trip(store: S3ArtifactStore) -> None:
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]

    digest = store.put_bytes("rounds/1/note.txt", b"hello")
    store.put_json("rounds/1/meta.json", {"server_round": 1, "sites": ["a", "b"]})
    store.put_weights("rounds/1/global.npz", weights)

    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.get_bytes("rounds/1/note.txt", expected_sha256=digest) == b"hello"
    assert store.get_json("rounds/1/meta.json") == {"server_round": 1, "sites": ["a", "b"]}
    for got, sent in zip(store.get_weights("rounds/1/global.npz"), weights, strict=True):
        np.testing.assert_array_equal(got, sent)
    assert store.exists("rounds/1/note.txt")
    assert not store.exists("rounds/1/absent.txt")


def test_objects_record_their_sha256_under_the_url_prefix(
    s3_endpoint: str, bucket: str, store: S3ArtifactStore
) -> None:
    digest = store.put_bytes("a.bin", b"payload")

    head = raw_client(s3_endpoint).head_object(Bucket=bucket, Key="jobs/7/a.bin")

    assert head["Metadata"]["sha256"] == digest


def test_put_file_above_the_threshold_goes_multipart(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_endpoint, bucket, tmp_path / "cache", multipart_threshold_mb=5)
    model = tmp_path / "model.bin"
    model.write_bytes(np.random.default_rng(0).bytes(12 * 2**20))

    digest = store.put_file("models/v1/model.bin", model)

    head = raw_client(s3_endpoint).head_object(Bucket=bucket, Key="models/v1/model.bin")
    assert digest == hashlib.sha256(model.read_bytes()).hexdigest()
    assert head["Metadata"]["sha256"] == digest
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts: really a multipart upload
    assert store.get_bytes("models/v1/model.bin", expected_sha256=digest) == model.read_bytes()


def test_a_body_replaced_outside_the_store_is_corrupt(s3_endpoint: str, bucket: str, store: S3ArtifactStore) -> None:
    digest = store.put_bytes("rounds/1/update.npz", b"honest update")
    raw_client(s3_endpoint).put_object(
        Bucket=bucket, Key="jobs/7/rounds/1/update.npz", Body=b"tampered", Metadata={"sha256": digest}
    )

    with pytest.raises(ArtifactCorrupt, match="recorded when it was written"):
        store.get_bytes("rounds/1/update.npz")


def test_a_digest_other_than_the_expected_one_is_corrupt(store: S3ArtifactStore) -> None:
    store.put_bytes("rounds/1/update.npz", b"update")

    with pytest.raises(ArtifactCorrupt, match="expected"):
        store.get_bytes("rounds/1/update.npz", expected_sha256=hashlib.sha256(b"other").hexdigest())


def test_a_missing_key_names_bucket_and_key(bucket: str, store: S3ArtifactStore) -> None:
    with pytest.raises(ArtifactMissing) as caught:
        store.get_bytes("rounds/9/global.npz")

    assert f"s3://{bucket}/jobs/7/rounds/9/global.npz" in caught.value.message
    assert caught.value.fix


def test_list_keys_is_recursive_sorted_and_relative_to_the_store(
    s3_endpoint: str, bucket: str, store: S3ArtifactStore
) -> None:
    for key in ("rounds/2/b", "rounds/1/sites/x/update", "rounds/1/a", "roundsX/1", "checkpoints/c"):
        store.put_bytes(key, b"-")
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key="elsewhere/rounds/1/z", Body=b"-")

    assert store.list_keys("rounds") == ["rounds/1/a", "rounds/1/sites/x/update", "rounds/2/b"]
    assert store.list_keys("rounds/1/sites") == ["rounds/1/sites/x/update"]
    assert store.list_keys("nothing") == []


def test_checkout_mirrors_and_drops_stale_files(s3_endpoint: str, bucket: str, store: S3ArtifactStore) -> None:
    store.put_bytes("models/v1/model.bin", b"weights")
    store.put_bytes("models/v1/sig/old.sig", b"old signature")
    store.put_bytes("models/v2/other.bin", b"not mine")

    folder = store.checkout("models/v1")
    assert _tree(folder) == {"model.bin": b"weights", "sig/old.sig": b"old signature"}

    raw_client(s3_endpoint).delete_object(Bucket=bucket, Key="jobs/7/models/v1/sig/old.sig")
    store.put_bytes("models/v1/model.bin", b"new weights")
    store.put_bytes("models/v1/model.sig", b"signature")
    (folder / "stray.txt").write_text("local only")

    again = store.checkout("models/v1")

    assert again == folder
    assert _tree(folder) == {"model.bin": b"new weights", "model.sig": b"signature"}
    assert not (folder / "sig").exists()


def test_a_second_checkout_downloads_only_what_changed(store: S3ArtifactStore) -> None:
    store.put_bytes("models/v1/model.bin", b"weights")
    store.put_bytes("models/v1/card.json", b"{}")
    folder = store.checkout("models/v1")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.05)
    store.put_bytes("models/v1/card.json", b'{"v": 2}')

    store.checkout("models/v1")

    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after["model.bin"] == before["model.bin"]  # unchanged remotely: left alone
    assert after["card.json"] != before["card.json"]
    assert (folder / "card.json").read_bytes() == b'{"v": 2}'


def test_checkout_restores_a_locally_edited_file(store: S3ArtifactStore) -> None:
    store.put_bytes("models/v1/model.bin", b"weights")
    folder = store.checkout("models/v1")
    (folder / "model.bin").write_bytes(b"edited!")

    store.checkout("models/v1")

    assert (folder / "model.bin").read_bytes() == b"weights"


def test_checkout_of_an_empty_prefix_is_an_empty_folder(store: S3ArtifactStore) -> None:
    folder = store.checkout("models/none")

    assert folder.is_dir()
    assert list(folder.iterdir()) == []


def test_checkout_refuses_a_corrupt_object(s3_endpoint: str, bucket: str, store: S3ArtifactStore) -> None:
    digest = store.put_bytes("models/v1/model.bin", b"weights")
    raw_client(s3_endpoint).put_object(
        Bucket=bucket, Key="jobs/7/models/v1/model.bin", Body=b"tampered", Metadata={"sha256": digest}
    )

    with pytest.raises(ArtifactCorrupt):
        store.checkout("models/v1")
    assert not (store.cache / "models/v1/model.bin").exists()
    assert [p.name for p in (store.cache / "models/v1").iterdir()] == []  # no partial download left behind


def test_put_and_get_survive_a_four_second_outage(bucket: str, flaky_proxy: FlakyProxy, tmp_path: Path) -> None:
    store = make_store(flaky_proxy.endpoint, bucket, tmp_path / "cache", retry_deadline_s=30)
    store.put_bytes("warm-up", b"x")  # a pooled connection that the outage will cut

    flaky_proxy.outage(4)
    started = time.monotonic()
    digest = store.put_bytes("rounds/1/global.npz", b"global weights")
    put_s = time.monotonic() - started

    flaky_proxy.outage(4)
    started = time.monotonic()
    body = store.get_bytes("rounds/1/global.npz", expected_sha256=digest)
    get_s = time.monotonic() - started

    assert body == b"global weights"
    assert 3.5 < put_s < 20 and 3.5 < get_s < 20  # it waited the outage out, and not much longer


def test_a_download_cut_mid_body_is_retried(bucket: str, flaky_proxy: FlakyProxy, tmp_path: Path) -> None:
    store = make_store(flaky_proxy.endpoint, bucket, tmp_path / "cache", retry_deadline_s=30)
    payload = np.random.default_rng(1).bytes(4 * 2**20)
    store.put_bytes("models/v1/model.bin", payload)

    flaky_proxy.outage(2, after_bytes=2**20)  # the endpoint drops out a quarter of the way into the body
    folder = store.checkout("models/v1")

    assert (folder / "model.bin").read_bytes() == payload


def test_a_multipart_upload_cut_mid_way_is_retried(bucket: str, flaky_proxy: FlakyProxy, tmp_path: Path) -> None:
    store = make_store(flaky_proxy.endpoint, bucket, tmp_path / "cache", multipart_threshold_mb=5, retry_deadline_s=30)
    model = tmp_path / "model.bin"
    model.write_bytes(np.random.default_rng(2).bytes(11 * 2**20))

    flaky_proxy.outage(2, after_bytes=6 * 2**20)  # after the first part
    digest = store.put_file("models/v1/model.bin", model)

    assert store.get_bytes("models/v1/model.bin", expected_sha256=digest) == model.read_bytes()


def test_an_outage_beyond_the_deadline_is_store_unavailable(
    bucket: str, flaky_proxy: FlakyProxy, tmp_path: Path
) -> None:
    store = make_store(flaky_proxy.endpoint, bucket, tmp_path / "cache", retry_deadline_s=1.5)
    flaky_proxy.down()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        store.put_bytes("rounds/1/global.npz", b"weights")

    assert time.monotonic() - started < 15
    assert flaky_proxy.endpoint in caught.value.message
    assert "reachable" in caught.value.fix
    flaky_proxy.up()
    assert store.put_bytes("rounds/1/global.npz", b"weights")  # and it recovers once the endpoint is back


@pytest.mark.parametrize(
    "url",
    [
        "http://bucket/prefix",  # not S3
        "bucket/prefix",  # no scheme at all
        "s3://",  # no bucket
        "s3://Quorum_Artifacts",  # upper case and underscore are not allowed in bucket names
        "s3://ab",  # too short for a bucket name
        "s3://key:secret@bucket",  # credentials never go in the URL
        "s3://bucket:9000/prefix",  # the endpoint is a separate setting
        "s3://bucket/jobs/../other",  # a prefix that climbs out
        "s3://bucket/jobs?version=2",  # query strings mean nothing here
    ],
)
def test_a_bad_url_is_refused_with_a_fix(url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreUrlInvalid) as caught:
        S3ArtifactStore(url, cache=tmp_path)

    assert "s3://" in caught.value.fix
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    "options",
    [
        {"multipart_threshold_mb": 4},  # S3 parts are at least 5 MB
        {"retry_deadline_s": 0},  # no time at all to reach the endpoint
    ],
)
def test_bad_tuning_is_refused(options: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        S3ArtifactStore("s3://bucket", cache=tmp_path, **options)  # type: ignore[arg-type]


def test_a_missing_bucket_says_to_create_it(s3_endpoint: str, tmp_path: Path) -> None:
    store = make_store(s3_endpoint, "quorum-no-such-bucket", tmp_path, retry_deadline_s=5)

    for operation in (lambda: store.put_bytes("a", b"-"), lambda: store.get_bytes("a"), lambda: store.list_keys("a")):
        with pytest.raises(BucketMissing) as caught:
            operation()
        assert "quorum-no-such-bucket" in caught.value.message
        assert "create" in caught.value.fix


def test_ensure_bucket_creates_once_and_is_idempotent(s3_endpoint: str, tmp_path: Path) -> None:
    store = make_store(s3_endpoint, f"quorum-made-{os.getpid()}-{time.time_ns() % 10**6}", tmp_path)

    store.ensure_bucket()
    store.ensure_bucket()

    assert store.put_bytes("a", b"-")


def test_no_credentials_is_access_denied(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = make_store(s3_endpoint, bucket, tmp_path)

    with pytest.raises(StoreAccessDenied, match="credentials") as caught:
        store.get_bytes("a")
    assert "AWS_PROFILE" in caught.value.fix


def test_refused_credentials_are_access_denied(s3_endpoint: str, tmp_path: Path) -> None:
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict_endpoint:  # knows no access key at all
        store = make_store(strict_endpoint, "quorum-locked", tmp_path, retry_deadline_s=5)

        with pytest.raises(StoreAccessDenied) as caught:
            store.put_bytes("a", b"-")

    assert "quorum-locked" in caught.value.fix and "credentials" in caught.value.fix


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "SlowDown", True),  # S3 asks the client to back off
        (500, "InternalError", True),  # a server fault
        (429, "TooManyRequests", True),  # throttled by a gateway in front of the endpoint
        (400, "RequestTimeout", True),  # the upload socket idled out; S3 says to retry
        (404, "NoSuchKey", False),  # waiting will not create the object
        (403, "AccessDenied", False),  # nor grant the permission
        (404, "NoSuchBucket", False),  # nor create the bucket
    ],
)
def test_only_failures_that_waiting_can_fix_are_retried(status: int, code: str, transient: bool) -> None:
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(error) is transient


def test_connection_failures_are_retried_but_decided_errors_are_not() -> None:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))
    assert not is_transient(StoreUnavailable("gave up", fix="-"))  # a ConnectionError, but already final
    assert not is_transient(ValueError("a bug, not the network"))


def test_the_store_pickles_without_its_client(store: S3ArtifactStore) -> None:
    store.put_bytes("a", b"before")

    copy = pickle.loads(pickle.dumps(store))

    assert copy.get_bytes("a") == b"before"
    assert copy.location == store.location


def test_importing_the_module_does_not_import_boto3() -> None:
    probe = "import sys, quorum.lineage.s3_store; print('boto3' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
