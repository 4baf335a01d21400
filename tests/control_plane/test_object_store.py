"""Artifacts, bundles and TUF metadata in an S3-compatible store: moto's real server on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from control_plane.errors import NotFoundError
from control_plane.s3 import S3ArtifactStore, S3Files, S3Location
from control_plane.settings import Settings
from control_plane.signing import TufRepository
from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    enroll,
    make_settings,
    push_version,
)
from tests.control_plane.loopback import S3_KEY, S3_REGION, S3_SECRET, moto_s3, s3_env


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        yield url


def location(endpoint: str, prefix: str) -> S3Location:
    return S3Location(
        bucket="edgefleet",
        prefix=prefix,
        endpoint_url=endpoint,
        region=S3_REGION,
        access_key_id=S3_KEY,
        secret_access_key=S3_SECRET,
        addressing_style="path",
    )


def test_blobs_are_stored_by_content_and_read_in_ranges(
    s3_endpoint: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = S3ArtifactStore(location(s3_endpoint, f"{request.node.name}/"))
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one streamed chunk
    source = tmp_path / "blob"
    source.write_bytes(data)
    ref = store.put_file(source)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert store.put_file(source) == ref  # the same content twice is a no-op
    assert store.count() == 1
    assert store.exists(ref.sha256)
    assert store.size(ref.sha256) == len(data)
    assert b"".join(store.read_range(ref.sha256, 1000, 1_100_000)) == data[1000:1_101_000]
    assert b"".join(store.read_range(ref.sha256, len(data) - 1, 1)) == data[-1:]
    assert store.copy_to(ref.sha256, tmp_path / "copy").read_bytes() == data
    missing = "0" * 64
    assert not store.exists(missing)
    assert not store.exists("not-a-digest")
    with pytest.raises(NotFoundError):
        store.size(missing)
    with pytest.raises(NotFoundError):
        store.read_range(missing, 0, 1)
    with pytest.raises(NotFoundError):
        store.copy_to(missing, tmp_path / "nothing")
    store.delete(ref.sha256)  # a collected model delta
    assert not store.exists(ref.sha256)
    store.delete(ref.sha256)  # gone already: not an error
    assert store.count() == 0


def test_two_replicas_share_one_tuf_repository(
    s3_endpoint: str, request: pytest.FixtureRequest
) -> None:
    loc = location(s3_endpoint, f"{request.node.name}/")
    files, keys, root = (S3Files(loc, d) for d in ("tuf/metadata", "tuf/keys", "tuf/root"))
    first = TufRepository.init(files, keys, root)
    second = TufRepository.init(files, keys, root)  # opens, never re-creates
    assert first.root_bytes() == second.root_bytes()
    assert root.exists("root.pem")
    first.add_targets({"bundles/m/1.0.0/onnx-fp32.tar": (10, "a" * 64)})
    second.add_targets({"bundles/m/1.0.0/ov-fp16.tar": (20, "b" * 64)})
    assert sorted(first.targets()) == [
        "bundles/m/1.0.0/onnx-fp32.tar",
        "bundles/m/1.0.0/ov-fp16.tar",
    ]
    assert files.exists("3.targets.json")
    with pytest.raises(NotFoundError):
        files.read("9.targets.json")


class TestServiceOnS3:
    @pytest.fixture
    def settings(
        self, tmp_path: Path, db_url: str, s3_endpoint: str, request: pytest.FixtureRequest
    ) -> Settings:
        env = s3_env(s3_endpoint)
        return make_settings(
            tmp_path / "data",
            db_url,
            object_store="s3",
            s3_bucket=env["EDGEFLEET_CP__S3_BUCKET"],
            s3_prefix=f"{request.node.name.replace('[', '-').replace(']', '')}/",
            s3_endpoint_url=s3_endpoint,
            s3_region=S3_REGION,
            s3_access_key_id=S3_KEY,
            s3_secret_access_key=S3_SECRET,
            s3_addressing_style="path",
        )

    def test_bundles_and_metadata_come_from_the_bucket_with_ranges(
        self,
        client: httpx.Client,
        settings: Settings,
        digits_path: Path,
        digits_sets: SampleFiles,
    ) -> None:
        version = push_version(client, digits_path, digits_sets)
        variant = version["variants"][0]
        device_id, device = enroll(client)
        r = client.post(
            "/v1/assignments",
            json={"model": "digits", "version": "1.0.0", "device_id": device_id},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        url = f"/v1/artifacts/bundles/digits/1.0.0/{variant['id']}.tar"
        whole = client.get(url, headers=device)
        assert whole.status_code == 200
        assert whole.headers["ETag"] == f'"{hashlib.sha256(whole.content).hexdigest()}"'
        part = client.get(url, headers={**device, "Range": "bytes=100-299"})
        assert part.status_code == 206
        assert part.content == whole.content[100:300]
        assert part.headers["Content-Range"] == f"bytes 100-299/{len(whole.content)}"
        assert client.get(url, headers={**device, "Range": "bytes=99999999-"}).status_code == 416
        timestamp = client.get("/tuf/timestamp.json")
        assert timestamp.status_code == 200
        assert timestamp.headers["Cache-Control"] == "no-store"
        assert client.get("/tuf/1.root.json").status_code == 200
        assert client.get("/tuf/99.root.json").status_code == 404
        # nothing that matters on the replica's disk: no blobs, no metadata, no keys
        assert not (settings.data_dir / "artifacts").exists()
        assert not (settings.data_dir / "tuf").exists()
