"""A fleet's durable store: an S3-compatible bucket that takes the outputs no
running instance can (the last holder is leaving and nothing can receive them).

The server never moves the bytes on the way in: it signs a short-lived PUT URL
(AWS Signature V4, query-string form) for the holder, which uploads from its
content-addressed store with the object's sha256 as signed metadata. The server
then confirms with a signed HEAD that the bucket holds that exact size and sha256
before it counts the object as safe. Keys are content addresses, so an upload is
idempotent and a retry overwrites with the same bytes.

Signing is plain HMAC over strings, so it needs no SDK and lives here, pure, with
time passed in; the one request the server itself makes (the confirming HEAD) is in
`corral.server.durable`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse
from dataclasses import dataclass

SHA_HEADER = "x-amz-meta-sha256"
KEY_PREFIX = "corral/objects/"


def _quote(s: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(s, safe=safe)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def presign(
    *,
    method: str,
    scheme: str,
    host: str,
    path: str,
    access_key: str,
    secret_key: str,
    region: str,
    now: float,
    expires: int,
    headers: dict[str, str] | None = None,
    service: str = "s3",
) -> str:
    """A URL that lets its bearer make one kind of request until `expires` seconds
    after `now`. `headers` (besides Host) are signed: the request must carry them
    with exactly these values."""
    t = time.gmtime(now)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", t)
    day = amz_date[:8]
    scope = f"{day}/{region}/{service}/aws4_request"
    signed = {"host": host, **{k.lower(): v.strip() for k, v in (headers or {}).items()}}
    names = sorted(signed)
    query = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": ";".join(names),
    }
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    canonical_path = _quote(path, safe="/-_.~")
    canonical = "\n".join(
        [
            method,
            canonical_path,
            canonical_query,
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), service), "aws4_request"
    )
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{scheme}://{host}{canonical_path}?{canonical_query}&X-Amz-Signature={signature}"


@dataclass(frozen=True)
class DurableStore:
    endpoint: str
    bucket: str
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"

    @classmethod
    def from_spec(cls, spec: dict[str, str]) -> DurableStore:
        return cls(
            endpoint=spec["endpoint"].rstrip("/"),
            bucket=spec["bucket"],
            access_key=spec.get("access_key", ""),
            secret_key=spec.get("secret_key", ""),
            region=spec.get("region") or "us-east-1",
        )

    @staticmethod
    def key(sha256: str) -> str:
        return KEY_PREFIX + sha256

    def url_of(self, sha256: str) -> str:
        """Where the object lives, for people to read (not a usable link)."""
        return f"{self.endpoint}/{self.bucket}/{self.key(sha256)}"

    def signed(
        self,
        method: str,
        sha256: str,
        now: float,
        expires: int = 900,
        headers: dict[str, str] | None = None,
    ) -> str:
        parts = urllib.parse.urlsplit(self.endpoint)
        path = f"{parts.path.rstrip('/')}/{self.bucket}/{self.key(sha256)}"
        return presign(
            method=method,
            scheme=parts.scheme,
            host=parts.netloc,
            path=path,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            now=now,
            expires=expires,
            headers=headers,
        )

    def put_order(self, sha256: str, now: float, expires: int) -> tuple[str, dict[str, str]]:
        """URL and headers for the holder's upload."""
        headers = {SHA_HEADER: sha256}
        return self.signed("PUT", sha256, now, expires, headers), headers

    def get_url(self, sha256: str, now: float) -> str:
        return self.signed("GET", sha256, now, 900)
