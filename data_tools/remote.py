"""Opening a shard that is not a local file: http(s):// URLs with resumption, everything else via gopen.

Why our own HTTP reader: a connection that drops in the middle of a multi-GB shard is normal on a
cluster (object-store front ends, proxies, idle timeouts). webdataset's gopen streams URLs through
`curl`, whose retries only cover failures before the first byte: a drop mid-transfer ends the
stream early, and the rest of the shard would be lost. `RetryingHTTPStream` instead notices the
short read (fewer bytes than Content-Length, or a socket error), reconnects with
`Range: bytes=<position>-` and `If-Range` (the ETag or Last-Modified of the first response, so the
bytes cannot come from a changed object) and continues where it stopped, up to `retries` times per
drop with a growing pause. Each resumption is logged as a warning. When it cannot resume (the
server ignores Range, the object changed, the retries are spent) the read raises OSError naming
the URL; the shard reader then counts the rest of that shard as bad samples with that reason
(`decode_error`), so nothing is lost silently.

Other remote forms (`pipe:aws s3 cp s3://bucket/shard.tar -`, `pipe:gsutil cat ...`, `gs://` and so
on) go to webdataset's gopen unchanged: a `pipe:` command is the user's own retry policy.
This is the only code that fetches a URL or runs a command, and it takes only locations that
data_tools.trust allowed (the user's opt-in, never a dataset.json's say).
"""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from typing import BinaryIO

from data_tools.trust import require_allowed


log = logging.getLogger(__name__)

RETRIES = 5
"""Resumptions attempted after one drop before the read fails."""
TIMEOUT_S = 60.0
"""Socket timeout of one HTTP request (connect and each read)."""
BACKOFF_S = 0.5
"""Pause before the first resumption; doubled after each failed one."""


def open_shard(location: str, retries: int = RETRIES, timeout_s: float = TIMEOUT_S) -> BinaryIO:
    """A binary stream of a remote shard: http(s) with resumption, anything else through gopen.
    `location` must come from data_tools.trust.shard_locations (RuntimeError otherwise: a bug)."""
    require_allowed(location)
    if location.startswith(("http://", "https://")):
        # unbuffered on purpose: a read returns what arrived before a failure, so the samples before
        # an unrecoverable drop are still delivered (the HTTP response buffers the socket itself)
        return RetryingHTTPStream(location, retries, timeout_s)
    from webdataset.gopen import gopen  # imports torch: only for remote shards

    return gopen(location, "rb")


class RetryingHTTPStream(io.RawIOBase):
    """A GET that survives dropped connections by resuming with a Range request (see the module)."""

    def __init__(self, url: str, retries: int = RETRIES, timeout_s: float = TIMEOUT_S) -> None:
        self.url, self.retries, self.timeout_s = url, retries, timeout_s
        self.position = 0
        self.length: int | None = None
        self.validator: str | None = None  # ETag or Last-Modified of the first response
        self.resumptions = 0
        self._response = self._request(0)

    def readable(self) -> bool:
        return True

    def _request(self, start: int) -> http.client.HTTPResponse:
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
            if self.validator:
                headers["If-Range"] = self.validator
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout_s)
        except urllib.error.HTTPError as err:
            raise OSError(f"{self.url}: HTTP {err.code} {err.reason}") from None
        if start == 0:
            length = response.headers.get("Content-Length")
            self.length = int(length) if length and length.isdigit() else None
            self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            return response
        content_range = response.headers.get("Content-Range", "")
        if response.status != 206 or not content_range.startswith(f"bytes {start}-"):
            response.close()
            raise OSError(
                f"{self.url}: the server did not resume at byte {start} (HTTP {response.status}, "
                f"Content-Range {content_range!r}): no Range support, or the object changed"
            )
        return response

    def readinto(self, buffer) -> int:
        if self.length is not None and self.position >= self.length:
            return 0
        failures = 0
        while True:
            try:
                count = self._response.readinto(buffer)
                if count or self.length is None or self.position >= self.length:
                    self.position += count
                    return count
                error: Exception = ConnectionError(f"connection closed at byte {self.position} of {self.length}")
            except (OSError, http.client.HTTPException) as err:  # IncompleteRead, reset, timeout
                error = err
            failures += 1
            if failures > self.retries:
                raise OSError(
                    f"{self.url}: {type(error).__name__}: {error}; gave up after {self.retries} "
                    f"resumptions at byte {self.position}"
                ) from None
            log.warning(
                "%s: %s at byte %d; resuming (attempt %d of %d)", self.url, error, self.position, failures, self.retries
            )
            self._response.close()
            time.sleep(BACKOFF_S * 2 ** (failures - 1))
            try:
                self._response = self._request(self.position)
                self.resumptions += 1
            except OSError as err:
                if "did not resume" in str(err):
                    raise
                log.warning("%s: %s", self.url, err)  # counts as a failed attempt; the loop retries

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            super().close()
