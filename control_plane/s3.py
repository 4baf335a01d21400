"""Artifacts and signed metadata in an S3-compatible object store (AWS S3, MinIO, Ceph RGW).

Owns the object layout under one bucket and prefix and the translation of botocore's errors;
what a blob is for, and who may read it, stays with the registry and the API. Two views of one
location: ``S3ArtifactStore`` (content-addressed blobs, the ``ArtifactStore`` interface, Range
reads with ``GetObject``'s ``Range``) and ``S3Files`` (named files: TUF metadata and the online
keys). Layout::

    <prefix>artifacts/sha256/ab/cd/<digest>
    <prefix>tuf/metadata/<N.role.json | timestamp.json>
    <prefix>tuf/keys/<role>.pem

S3 writes are atomic per object (a reader sees the old object or the new one, never a part), so
no temp-and-rename dance is needed. Downloads are streamed through the API rather than handed
out as presigned URLs: a device may only fetch what its desired state names (checked per
request), devices need no route to the store, and the store's credentials never leave the
control plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from control_plane.artifacts import CHUNK, ArtifactRef, digest_path, sha256_file
from control_plane.errors import NotFoundError, StorageError

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

__all__ = ["S3ArtifactStore", "S3Files", "S3Location", "s3_client"]

_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2)


@dataclass(frozen=True)
class S3Location:
    """Where objects live and how to reach the store. No keys: boto3's default chain."""

    bucket: str
    prefix: str = ""  # e.g. "edgefleet/": every key starts with it
    endpoint_url: str | None = None  # None: AWS; MinIO, Ceph RGW: their URL
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"  # MinIO / RGW: usually "path"
    timeout_s: float = 30.0  # connect and read timeout per request, seconds


def s3_client(location: S3Location) -> S3Client:
    config = Config(
        connect_timeout=location.timeout_s,
        read_timeout=location.timeout_s,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": location.addressing_style},
        max_pool_connections=32,
    )
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=location.endpoint_url,
        region_name=location.region,
        aws_access_key_id=location.access_key_id,
        aws_secret_access_key=location.secret_access_key,
        config=config,
    )
    return client


def _missing(exc: ClientError) -> bool:
    error: Any = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code")) in _MISSING or status == 404


class S3ArtifactStore:
    """Content-addressed blobs in a bucket; the same five methods as the local store."""

    def __init__(self, location: S3Location, client: S3Client | None = None) -> None:
        self.location = location
        self._client = client or s3_client(location)

    def _key(self, sha256: str) -> str:
        return f"{self.location.prefix}artifacts/{digest_path(sha256)}"

    def put_file(self, source: Path) -> ArtifactRef:
        ref = sha256_file(source)
        key = self._key(ref.sha256)
        try:
            if self._head_size(key) == ref.size:
                return ref
            self._client.upload_file(
                str(source),
                self.location.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=_TRANSFER,
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StorageError(f"cannot store artifact {ref.sha256}: {exc}") from exc
        return ref

    def exists(self, sha256: str) -> bool:
        try:
            return self._head_size(self._key(sha256)) is not None
        except NotFoundError:
            return False

    def size(self, sha256: str) -> int:
        size = self._head_size(self._key(sha256))
        if size is None:
            raise NotFoundError(f"no artifact {sha256}")
        return size

    def read_range(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        key = self._key(sha256)
        if self._head_size(key) is None:
            raise NotFoundError(f"no artifact {sha256}")
        return self._chunks(key, start, length)

    def copy_to(self, sha256: str, dest: Path) -> Path:
        key = self._key(sha256)
        try:
            self._client.download_file(self.location.bucket, key, str(dest), Config=_TRANSFER)
        except ClientError as exc:
            if _missing(exc):
                raise NotFoundError(f"no artifact {sha256}") from exc
            raise StorageError(f"cannot read artifact {sha256}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"cannot read artifact {sha256}: {exc}") from exc
        return dest

    def delete(self, sha256: str) -> None:
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=self._key(sha256))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot delete artifact {sha256}: {exc}") from exc

    def count(self) -> int:
        """How many blobs are stored (tests check that a refused upload stored nothing)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=f"{self.location.prefix}artifacts/"
        )
        return sum(len(page.get("Contents", [])) for page in pages)

    def _head_size(self, key: str) -> int | None:
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise StorageError(f"cannot reach the object store: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach the object store: {exc}") from exc
        return int(head["ContentLength"])

    def _chunks(self, key: str, start: int, length: int) -> Iterator[bytes]:
        # Requested on the first read: a response dropped before it streams costs no request.
        if length <= 0:
            return
        try:
            body = self._client.get_object(
                Bucket=self.location.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc


class S3Files:
    """Named small files under ``<prefix><folder>/`` (TUF metadata, keys)."""

    def __init__(self, location: S3Location, folder: str, client: S3Client | None = None) -> None:
        self.location = location
        self._base = f"{location.prefix}{folder.strip('/')}/"
        self._client = client or s3_client(location)

    def read(self, name: str) -> bytes:
        try:
            obj = self._client.get_object(Bucket=self.location.bucket, Key=self._base + name)
            return obj["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise NotFoundError(f"no file {name!r}") from exc
            raise StorageError(f"cannot read {name!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {name!r}: {exc}") from exc

    def write(self, name: str, data: bytes) -> None:
        try:
            self._client.put_object(
                Bucket=self.location.bucket,
                Key=self._base + name,
                Body=data,
                ChecksumAlgorithm="SHA256",
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot write {name!r}: {exc}") from exc

    def exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=self._base + name)
        except ClientError as exc:
            if _missing(exc):
                return False
            raise StorageError(f"cannot reach the object store: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach the object store: {exc}") from exc
        return True
