"""The pure parts of artifact access: ids, the cache's keys, and errors mapped to ours.

Listing, paging and downloading talk to the artifact manager and S3; the
service tests cover them on the real stack.
"""

from __future__ import annotations

import os

import pytest

from cellpose_finetuning.data.artifacts import (
    ArtifactFiles,
    FileInfo,
    _map_error,
    artifact_uid,
    artifact_version,
    parse_artifact_id,
)
from cellpose_finetuning.errors import Forbidden, InvalidInput, NotFound

UID = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ws-user-alice/cells", "ws-user-alice/cells"),
        ("  lab/data.v2_x-1  ", "lab/data.v2_x-1"),
        ("https://hypha.example.org/ws-user-alice/artifacts/cells", "ws-user-alice/cells"),
        ("http://127.0.0.1:9527/lab/artifacts/data/files/a.tif?x=1", "lab/data"),
    ],
)
def test_artifact_ids_and_urls_normalise_to_workspace_slash_alias(given, expected):
    assert parse_artifact_id(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "",
        "   ",
        None,
        "cells",
        "a/b/c",
        "ws/../x",
        "ws/.hidden",
        "ws/al ias",
        "https://host/ws/files/cells",
        "https://host/ws",
    ],
)
def test_anything_else_is_refused_naming_the_argument(given):
    with pytest.raises(InvalidInput) as err:
        parse_artifact_id(given, "dataset")
    assert err.value.what == "dataset"


def test_file_info_matches_only_a_file_with_the_same_size_and_store_time(tmp_path):
    local = tmp_path / "a.tif"
    local.write_bytes(b"12345")
    os.utime(local, (1_700_000_000.0, 1_700_000_000.0))
    assert FileInfo(5, 1_700_000_000.0).matches(local)
    assert not FileInfo(6, 1_700_000_000.0).matches(local)
    assert not FileInfo(5, 1_700_000_001.0).matches(local)
    assert not FileInfo(None, 1_700_000_000.0).matches(local)  # unknown: download again
    assert not FileInfo(5, None).matches(local)
    assert not FileInfo(5, 1_700_000_000.0).matches(tmp_path / "missing.tif")


def test_the_internal_id_must_look_like_an_id():
    assert artifact_uid({"_id": UID}) == UID
    for bad in ({}, {"_id": "short"}, {"_id": "../../etc"}, {"_id": "a" * 65}):
        with pytest.raises(InvalidInput, match="no usable id"):
            artifact_uid({"id": "ws/x", **bad})


def test_the_version_is_the_last_committed_one_else_stage():
    assert artifact_version({"versions": [{"version": "v0"}, {"version": "v1"}]}) == "v1"
    assert artifact_version({"versions": []}) == "stage"
    assert artifact_version({}) == "stage"
    assert artifact_version({"versions": [{"version": "../x"}]}) == "stage"


def test_cache_paths_are_keyed_by_internal_id_and_version_never_by_alias(tmp_path):
    files = ArtifactFiles(None, tmp_path)
    v0 = {"id": "ws/cells", "_id": UID, "versions": [{"version": "v0"}]}
    recreated = {**v0, "_id": UID.replace("0b1c", "ffff")}
    v1 = {**v0, "versions": [{"version": "v0"}, {"version": "v1"}]}
    path = files.cache_path(v0, "images/a.tif")
    assert path == tmp_path / UID / "v0" / "images" / "a.tif"
    assert files.cache_path(recreated, "images/a.tif") != path
    assert files.cache_path(v1, "images/a.tif") != path
    with pytest.raises(InvalidInput):
        files.cache_path(v0, "../../outside.tif")


@pytest.mark.parametrize(
    ("text", "mapped"),
    [
        ("KeyError: artifact ws/x does not exist", NotFound),
        ("Artifact not found", NotFound),
        ("PermissionError: User alice has no permission", Forbidden),
    ],
)
def test_artifact_manager_errors_become_ours(text, mapped):
    assert isinstance(_map_error(RuntimeError(text), "ws/x"), mapped)


def test_other_errors_are_kept_as_they_are():
    exc = RuntimeError("connection reset")
    assert _map_error(exc, "ws/x") is exc
