"""The "s3" driver: objects in one bucket of Amazon S3 or any S3-compatible service.

A key maps to the object `<prefix><key>` in `bucket`. Writes are atomic because S3's
are: a single PutObject below `multipart_threshold`, else a multipart upload that is
completed only once every part is in, and aborted on any failure.

Settings:
  bucket               the bucket
  endpoint_url         for S3-compatible services (MinIO, Ceph, ...); None means AWS
  region               the bucket's region (default us-east-1)
  access_key_id        credentials; both or neither: without them boto3's own chain
  secret_access_key    (environment, profile, instance role) is used
  prefix               a root inside the bucket, e.g. "ferry/" ('' = the whole bucket)
  multipart_threshold  objects of at least this size go up in parts (default 64 MiB)
  part_size            size of each part (default 16 MiB, at least 5 MiB as S3 requires);
                       grown for a known size so the upload fits S3's 10,000 parts
  create_bucket        create the bucket on first use if it does not exist
  addressing_style     "path", "virtual" or "auto" (boto3's default when unset)
  connect_timeout, read_timeout, max_attempts
                       botocore's socket timeouts (seconds) and attempts per request

Memory: a write holds at most about max(multipart_threshold, part_size) bytes, whatever
the object's size. Bodies are sent as bytes, not streamed from the caller's iterator:
botocore must rewind a body to retry a request and, over plain HTTP, to hash it for the
signature, which a one-pass iterator cannot do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Literal

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field, SecretStr, field_validator, model_validator

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    FerryError,
    InvalidKey,
    KeyNotFound,
)
from workers.base import (
    CHUNK_SIZE,
    Backend,
    ChunkReader,
    DriverConfig,
    ObjectStat,
    check_key,
    check_prefix,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB  # S3's maximum part, and maximum single PUT
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024  # S3's limit on a full object key, in UTF-8 bytes

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# Worth retrying later: the service is there but overloaded or failing.
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
              "ThrottlingException"}


class S3Config(DriverConfig):
    bucket: str = Field(min_length=1)
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    # SecretStr: the value never shows in a repr, a log line or an error message.
    secret_access_key: SecretStr | None = None
    prefix: str = ""
    multipart_threshold: int = Field(default=64 * MiB, ge=1, le=MAX_PART_SIZE)
    part_size: int = Field(default=16 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    create_bucket: bool = False
    addressing_style: Literal["auto", "virtual", "path"] | None = None
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_directory(cls, value: str) -> str:
        """'' or a relative path, normalized to end with '/' so "a" and "a/" mean the same."""
        try:
            check_prefix(value)
        except InvalidKey as exc:
            raise ValueError(exc.message) from None
        return value if value == "" or value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _both_credentials_or_neither(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        return self


class S3Backend(Backend):
    """Objects in `config.bucket` under `config.prefix`."""

    driver: ClassVar[str] = "s3"
    Config: ClassVar[type[DriverConfig]] = S3Config
    config: S3Config

    def __init__(self, name: str, config: S3Config):
        super().__init__(name, config)
        self._client: Any = None
        self._bucket_ready = not config.create_bucket

    # -- client ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client, built on first use (building one costs ~100 ms) and kept."""
        if self._client is None:
            c = self.config
            # Our own session: boto3's default session is shared and not thread-safe.
            session = boto3.session.Session(
                aws_access_key_id=c.access_key_id,
                aws_secret_access_key=c.secret_access_key.get_secret_value() if c.secret_access_key else None,
                region_name=c.region,
            )
            self._client = session.client(
                "s3",
                endpoint_url=c.endpoint_url,
                config=BotoConfig(
                    retries={"mode": "standard", "max_attempts": c.max_attempts},
                    connect_timeout=c.connect_timeout,
                    read_timeout=c.read_timeout,
                    s3={"addressing_style": c.addressing_style} if c.addressing_style else None,
                    # Checksums only where S3 demands them: Ferry verifies content by its
                    # own hash, and several S3-compatible services reject the aws-chunked
                    # trailing checksums botocore would otherwise send.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def _s3(self) -> Any:
        """The client, with the bucket created first if so configured."""
        client = self.client
        if not self._bucket_ready:
            self._ensure_bucket(client)
            self._bucket_ready = True
        return client

    def _ensure_bucket(self, client: Any) -> None:
        try:
            client.head_bucket(Bucket=self.config.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(exc, f"bucket {self.config.bucket!r}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"bucket {self.config.bucket!r}") from exc
        params: dict[str, Any] = {"Bucket": self.config.bucket}
        if self.config.region != "us-east-1":  # us-east-1 refuses an explicit constraint
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            client.create_bucket(**params)
        except ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":  # created meanwhile by another worker
                raise self._error(exc, f"create bucket {self.config.bucket!r}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"create bucket {self.config.bucket!r}") from exc
        log.info("backend %r: created bucket %r", self.name, self.config.bucket)

    # -- keys and errors ------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        full = self.config.prefix + key
        if len(full.encode("utf-8")) > MAX_KEY_BYTES:
            raise InvalidKey(f"key {key!r} is longer than S3's {MAX_KEY_BYTES} bytes", field="key")
        return full

    def _error(self, exc: Exception, what: str) -> FerryError:
        """The Ferry error for a botocore failure while doing `what`."""
        where = f"backend {self.name!r} (bucket {self.config.bucket!r})"
        if isinstance(exc, ClientError):
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _NOT_FOUND:
                return KeyNotFound(f"{what} not found on {where}")
            detail = f"{where}: {what}: S3 error {code} (HTTP {status}) {message}".rstrip()
            # A missing bucket is a misconfiguration, not a missing key: the backend as
            # configured is unusable until someone fixes it, as check() reports.
            if code == "NoSuchBucket" or code in _TRANSIENT or status >= 500:
                return BackendUnavailable(detail, details={"s3_code": code})
            return BackendError(detail, details={"s3_code": code})
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return BackendUnavailable(f"{where}: {what}: cannot reach S3: {exc}")
        return BackendError(f"{where}: {what}: {type(exc).__name__}: {exc}")

    def _call(self, what: str, method: Callable[..., Any], **params: Any) -> Any:
        try:
            return method(Bucket=self.config.bucket, **params)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, what) from exc

    # -- verbs ----------------------------------------------------------------------

    def stat(self, key: str) -> ObjectStat:
        obj = self._key(key)
        head = self._call(f"key {key!r}", self._s3().head_object, Key=obj)
        return _stat(key, head["ContentLength"], head.get("LastModified"), head.get("ETag"))

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        obj = self._key(key)
        response = self._call(f"key {key!r}", self._s3().get_object, Key=obj)
        return ChunkReader(response["Body"], chunk_size, lambda exc: self._error(exc, f"read {key!r}"),
                           errors=(BotoCoreError, OSError))

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        obj = self._key(key)
        client = self._s3()
        threshold = self.config.multipart_threshold
        chunks = iter(chunks)
        if size is not None and size >= threshold:
            return self._multipart(key, obj, chunks, [bytearray()], size)
        # Below the threshold (or while the size is unknown) buffer up to `threshold`
        # bytes: a stream that ends before is one PutObject, a longer one goes multipart
        # starting with what is buffered.
        buffer = bytearray()
        for chunk in chunks:
            buffer += chunk
            if size is not None and len(buffer) > size:
                raise BackendError(f"write {key!r}: more than the announced {size} bytes")
            if size is None and len(buffer) >= threshold:
                # Hand over the only reference: held here, the buffer would stay alive
                # (as the first part) for the whole upload.
                pending = [buffer]
                del buffer
                return self._multipart(key, obj, chunks, pending, None)
        if size is not None and len(buffer) != size:
            raise BackendError(f"write {key!r}: got {len(buffer)} bytes, {size} were announced")
        # botocore takes a bytearray as it is: no second copy of the buffer.
        self._call(f"write {key!r}", client.put_object, Key=obj, Body=buffer)
        return len(buffer)

    def _multipart(self, key: str, obj: str, chunks: Iterator[bytes], pending: list[bytearray],
                   size: int | None) -> int:
        """Upload `pending[0]` (taken out of the list) then the rest of `chunks` in parts."""
        buffer = pending.pop()
        client = self._s3()
        part_size = self.config.part_size
        if size is not None:
            # Grow the parts of a known huge object so they fit in S3's 10,000.
            part_size = max(part_size, -(-size // MAX_PARTS))
        upload_id = self._call(f"write {key!r}", client.create_multipart_upload, Key=obj)["UploadId"]
        parts: list[dict[str, Any]] = []

        def upload(body: bytes | bytearray) -> None:
            number = len(parts) + 1
            if number > MAX_PARTS:
                raise BackendError(
                    f"write {key!r}: larger than {MAX_PARTS} parts of {part_size} bytes; raise part_size"
                )
            answer = self._call(f"write {key!r} (part {number})", client.upload_part,
                                Key=obj, UploadId=upload_id, PartNumber=number, Body=body)
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})

        def flush_full_parts() -> None:
            nonlocal buffer
            while len(buffer) >= part_size:
                if len(buffer) == part_size:  # the common case: hand it over, no copy
                    body, buffer = buffer, bytearray()
                else:
                    body = buffer[:part_size]
                    del buffer[:part_size]
                upload(body)

        total = len(buffer)
        try:
            flush_full_parts()
            for chunk in chunks:
                total += len(chunk)
                if size is not None and total > size:
                    raise BackendError(f"write {key!r}: more than the announced {size} bytes")
                buffer += chunk
                flush_full_parts()
            if size is not None and total != size:
                raise BackendError(f"write {key!r}: got {total} bytes, {size} were announced")
            if buffer or not parts:
                upload(buffer)
            self._call(f"write {key!r}", client.complete_multipart_upload,
                       Key=obj, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            # Whatever failed (S3, the caller's iterator, an interrupt): drop the parts,
            # which S3 would otherwise keep, and bill, forever.
            try:
                client.abort_multipart_upload(Bucket=self.config.bucket, Key=obj, UploadId=upload_id)
            except Exception:
                log.warning("backend %r: could not abort multipart upload %s of %r",
                            self.name, upload_id, obj, exc_info=True)
            raise
        return total

    def delete(self, key: str) -> bool:
        obj = self._key(key)
        client = self._s3()
        # S3 answers a DELETE of a missing key with success: ask first to report it.
        try:
            self._call(f"key {key!r}", client.head_object, Key=obj)
        except KeyNotFound:
            return False
        self._call(f"delete {key!r}", client.delete_object, Key=obj)
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        check_prefix(prefix)  # now, not at the first next()
        paginator = self._s3().get_paginator("list_objects_v2")
        return self._list(paginator, prefix)

    def _list(self, paginator: Any, prefix: str) -> Iterator[ObjectStat]:
        strip = len(self.config.prefix)
        try:
            # S3 returns keys in UTF-8 byte order, one page of up to 1,000 at a time.
            for page in paginator.paginate(Bucket=self.config.bucket, Prefix=self.config.prefix + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][strip:]
                    try:
                        check_key(key)
                    except InvalidKey:
                        continue  # e.g. a console's "folder/" marker: no Ferry key names it
                    yield _stat(key, item["Size"], item.get("LastModified"), item.get("ETag"))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"list {prefix!r}") from exc

    def check(self) -> None:
        try:
            client = self._s3()
            client.head_bucket(Bucket=self.config.bucket)
        except FerryError as exc:
            raise BackendUnavailable(exc.message) from exc
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "check")
            if isinstance(exc, ClientError) and _code(exc) in _NOT_FOUND:
                # HeadBucket has no body, so a missing bucket is a bare 404.
                raise BackendUnavailable(
                    f"backend {self.name!r}: bucket {self.config.bucket!r} does not exist"
                ) from exc
            raise BackendUnavailable(error.message) from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _stat(key: str, size: int, modified: Any, etag: str | None) -> ObjectStat:
    return ObjectStat(
        key=key,
        size=int(size),
        mtime=modified.timestamp() if modified is not None else None,
        etag=etag.strip('"') if etag else None,
    )
