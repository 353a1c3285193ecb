"""The request/reply exchange of one job, laid out in the artifact store.

``jobs/JOB/requests/NNNNNN.json`` holds request NNNNNN and ``requests/latest.json`` the newest one;
``jobs/JOB/replies/NNNNNN/SITE.json`` (plus ``SITE.npz`` for weights) holds a site's reply; files a
request ships (the ONNX variants a promotion compares) sit under ``requests/NNNNNN/``. Objects
are written atomically and weights are named with their sha256, so the two sides only ever need to
poll one small file and can verify everything they read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from quorum.configs.errors import QuorumError, ReplyRejected
from quorum.lineage.artifacts import ArtifactCorrupt, ArtifactStore
from quorum.tasks.wire import Failure, Request, decode_request, encode_failure, encode_request


@dataclass(frozen=True)
class JobExchange:
    store: ArtifactStore
    job_id: str

    def _key(self, *parts: str) -> str:
        return "/".join(("jobs", self.job_id, *parts))

    def post(
        self, request: Request, weights: Sequence[Any] | None = None, files: Mapping[str, bytes] | None = None
    ) -> Request:
        """Write the request's weights and files (if any) and then the request, newest pointer last."""
        if weights is not None:
            key = self._key("requests", f"{request.seq:06d}.npz")
            digest = self.store.put_weights(key, weights)
            request = replace(request, weights_key=key, weights_sha256=digest)
        if files is not None:
            refs = {}
            for name, data in sorted(files.items()):
                key = self._key("requests", f"{request.seq:06d}", f"{name}.bin")
                refs[name] = {"key": key, "sha256": self.store.put_bytes(key, data)}
            request = replace(request, files=refs)
        payload = encode_request(request)
        self.store.put_json(self._key("requests", f"{request.seq:06d}.json"), payload)
        self.store.put_json(self._key("requests", "latest.json"), payload)
        return request

    def latest(self) -> Request | None:
        key = self._key("requests", "latest.json")
        if not self.store.exists(key):
            return None
        data = self.store.get_json(key)
        return decode_request(data)

    def next_seq(self) -> int:
        latest = self.latest()
        return 1 if latest is None else latest.seq + 1

    def request_weights(self, request: Request) -> list[Any]:
        if request.weights_key is None:
            raise ArtifactCorrupt(f"request {request.seq} carries no weights", fix="re-run the job")
        return self.store.get_weights(request.weights_key, request.weights_sha256)

    def request_files(self, request: Request) -> dict[str, bytes]:
        """The files a request ships, each checked against the sha256 the request names."""
        if not request.files:
            raise ArtifactCorrupt(f"request {request.seq} carries no files", fix="re-run the job")
        return {name: self.store.get_bytes(ref["key"], ref["sha256"]) for name, ref in request.files.items()}

    def reply(self, seq: int, site_id: str, payload: dict[str, Any], weights: Sequence[Any] | None = None) -> None:
        if weights is not None:
            key = self._key("replies", f"{seq:06d}", f"{site_id}.npz")
            payload = {**payload, "weights_key": key, "weights_sha256": self.store.put_weights(key, weights)}
        self.store.put_json(self._key("replies", f"{seq:06d}", f"{site_id}.json"), payload)

    def fail(self, seq: int, site_id: str, error: QuorumError) -> None:
        self.reply(seq, site_id, encode_failure(Failure(error.headline, error.message, error.fix)))

    def read_reply(self, seq: int, site_id: str) -> dict[str, Any] | None:
        key = self._key("replies", f"{seq:06d}", f"{site_id}.json")
        if not self.store.exists(key):
            return None
        data = self.store.get_json(key)
        if not isinstance(data, dict):
            return encode_failure(Failure(ReplyRejected.headline, "the reply is not a JSON object", ""))
        return data

    def reply_weights(self, key: str, sha256: str) -> list[Any]:
        return self.store.get_weights(key, sha256)

    def beat(self, site_id: str) -> None:
        """A session's sign of life, so the coordinator stops waiting for a site whose worker died."""
        self.store.put_json(self._key("sessions", f"{site_id}.json"), {"site_id": site_id, "at": time.time()})

    def silent_for(self, site_id: str, since: float = 0.0) -> float | None:
        """Seconds since the site's session last beat; ``None`` if no session beat since ``since`` (a
        ``time.time()``: the sessions started then are the ones waited for)."""
        key = self._key("sessions", f"{site_id}.json")
        if not self.store.exists(key):
            return None
        data: Any = self.store.get_json(key)
        at = float(data["at"])
        return None if at < since else time.time() - at

    def replied(self, site_id: str) -> int:
        """The newest request this site already answered: where a restarted session picks up."""
        answered = [
            int(parts[-2])
            for parts in (key.split("/") for key in self.store.list_keys(self._key("replies")))
            if parts[-1] == f"{site_id}.json" and parts[-2].isdigit()
        ]
        return max(answered, default=0)
