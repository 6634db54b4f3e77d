# SPDX-License-Identifier: Apache-2.0
"""The embedded store's fast listing: localbucket's answers, page for page, and the same
XML bytes as ElementTree writes (broker_config.store_listing)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import localbucket
import pytest

from parkpool.broker_config import objectstore, store_listing

NAMES = ("a/1", "a/2", "a/b/3", "a/b/4/5", "ab", "abc/6", "b/1", "é/1", "z~", "c")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in NAMES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / f"{localbucket.TEMP_PREFIX}half-written").write_bytes(b"x")
    return tmp_path


def _localbucket_page(folder: Path, *args: object) -> store_listing.Page:
    contents, common, truncated, last = localbucket.S3Handler._list_entries(None, folder, *args)
    return [(key, str(path)) for key, path in contents], common, truncated, last


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b/", "ab", "b/", "é", "zz"])
@pytest.mark.parametrize("delimiter", ["", "/"])
@pytest.mark.parametrize("marker", ["", "a/1", "a/b", "a/b/", "ab", "c"])
@pytest.mark.parametrize("max_keys", [0, 1, 2, 1000])
def test_every_page_is_localbuckets(
    folder: Path, prefix: str, delimiter: str, marker: str, max_keys: int
) -> None:
    for marker_is_prefix in (False, True):
        args = (prefix, delimiter, marker, marker_is_prefix, max_keys)
        assert store_listing.page(folder, *args) == _localbucket_page(folder, *args), args


def test_a_missing_folder_lists_nothing(tmp_path: Path) -> None:
    assert store_listing.page(tmp_path / "gone", "", "", "", False, 10) == ([], [], False, "")


def test_the_xml_is_elementtrees_byte_for_byte() -> None:
    # Given a listing with escapes in text and in an attribute, an empty element and a tail
    root = ET.Element("ListBucketResult", xmlns="http://s3.amazonaws.com/doc/2006-03-01/")
    item = ET.SubElement(root, "Contents", note='say "a<b" & go\n\t\r')
    ET.SubElement(item, "Key").text = "a&b/<c>é"
    ET.SubElement(item, "Empty")
    ET.SubElement(root, "Marker").tail = "&"
    # Then the fast writer's bytes are ElementTree's
    expected = ET.tostring(root, encoding="UTF-8", xml_declaration=True)
    assert store_listing.to_xml(root) == expected


def test_a_namespaced_tag_is_left_to_elementtree() -> None:
    root = ET.Element("{http://s3.amazonaws.com/doc/2006-03-01/}Error")
    ET.SubElement(root, "Code").text = "NoSuchKey"
    assert store_listing.to_xml(root) == ET.tostring(root, "UTF-8", xml_declaration=True)


@pytest.mark.parametrize("epoch", [0.0, 1.5, 1_796_585_863.977, 2**31 + 0.999])
def test_listed_dates_are_written_as_localbucket_writes_them(epoch: float) -> None:
    assert objectstore._iso_timestamp(epoch) == localbucket.iso_timestamp(epoch)


def test_an_object_deleted_after_the_scan_is_neither_listed_nor_counted(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a scan of a folder, after which one of its objects is deleted (a DeleteObject
    # racing the listing)
    real_page = store_listing.page

    def racing_page(below: Path, *args: object) -> store_listing.Page:
        page = real_page(below, *args)  # type: ignore[arg-type]
        Path(page[0][1][1]).unlink()
        return page

    monkeypatch.setattr(store_listing, "page", racing_page)
    handler = objectstore.VerifyingHandler.__new__(objectstore.VerifyingHandler)
    # When the store lists it
    contents, _, _, _ = handler._list_entries(folder, "a/", "", "", False, 1000)
    # Then the deleted object is not among the entries (so not in KeyCount), the rest are
    assert [key for key, _ in contents] == ["a/1", "a/b/3", "a/b/4/5"]
    assert set(handler._stats) == {path for _, path in contents}


@pytest.mark.parametrize("key", ["a/../b", "./a", "a//b", "a/", "..", "a/."])
def test_a_key_that_could_leave_its_bucket_is_refused(tmp_path: Path, key: str) -> None:
    (tmp_path / "bkt").mkdir()
    handler = objectstore.VerifyingHandler.__new__(objectstore.VerifyingHandler)
    handler.data_root = tmp_path
    with pytest.raises(localbucket.S3Error, match="does not support this key"):
        handler._object_path("bkt", key)


def test_a_key_is_joined_under_its_bucket(tmp_path: Path) -> None:
    (tmp_path / "bkt").mkdir()
    handler = objectstore.VerifyingHandler.__new__(objectstore.VerifyingHandler)
    handler.data_root = tmp_path
    assert handler._object_path("bkt", "jobs/x/in/é~") == tmp_path / "bkt/jobs/x/in/é~"
