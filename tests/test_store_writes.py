# SPDX-License-Identifier: Apache-2.0
"""The embedded store stages a write's body beside its object before it takes the
object's lock (broker_config.store_writes): a slow writer holds up no other writer of
the same key, and a folder a delete empties under a write is made again."""

from __future__ import annotations

import http.client
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import localbucket
import pytest
from botocore.exceptions import ClientError

from parkpool.broker_config import store_writes
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.schemas.blobref import output_key
from tests.helpers import wait_for

SIZE = 1 << 20  # over store_puts.STREAMED_BYTES: the streamed path a car's upload takes


def test_a_folder_removed_between_mkdir_and_mkstemp_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "jobs" / "j1" / "out" / "k"
    real = tempfile.mkstemp
    calls = []

    def racing(**kwargs: str) -> tuple[int, str]:
        calls.append(kwargs["dir"])
        if len(calls) == 1:  # a delete empties and removes the folder just made
            Path(kwargs["dir"]).rmdir()
        return real(**kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", racing)
    fd, temp = store_writes.temp_beside(target)
    with open(fd, "wb") as file:
        file.write(b"x")
    assert len(calls) == 2
    assert Path(temp).parent == target.parent
    assert Path(temp).name.startswith(localbucket.TEMP_PREFIX)  # hidden from listings


def test_a_folder_that_keeps_vanishing_is_an_error_not_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def vanishing(**kwargs: str) -> tuple[int, str]:
        calls.append(1)
        raise FileNotFoundError(kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkstemp", vanishing)
    with pytest.raises(FileNotFoundError):
        store_writes.temp_beside(tmp_path / "a" / "k")
    assert len(calls) == store_writes.ATTEMPTS


def test_a_folder_removed_inside_mkdir_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path.mkdir(exist_ok=True) raises FileExistsError when the folder it failed to make
    (it was there) is gone by the time it checks that it is a folder."""
    target = tmp_path / "jobs" / "k"
    real = Path.mkdir
    calls = []

    def racing(self: Path, *args: object, **kwargs: object) -> None:
        calls.append(self)
        if len(calls) == 1:
            raise FileExistsError(str(self))
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", racing)
    fd, temp = store_writes.temp_beside(target)
    with open(fd, "wb"):
        pass
    assert len(calls) == 2 and Path(temp).parent == target.parent


def test_a_staged_file_not_moved_into_place_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "k"
    with pytest.raises(RuntimeError), store_writes.staged(target, lambda f: "etag") as (temp, _):
        assert Path(temp).exists()
        raise RuntimeError("refused")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_slow_conditional_put_holds_up_no_other_writer_of_its_key(
    store: BlobStore, brokers: EmbeddedBrokers
) -> None:
    """A car on a weak link uploading to its write-once URL: the body arrives slowly, and
    another writer of the same key must not wait for it (the store's timeout is 60 s)."""
    key = output_key("slowput", "gw", 1, 1)
    folder = brokers.run_dir / "store" / store.bucket / key.rpartition("/")[0]
    slow_body, fast_body = b"s" * SIZE, b"f" * SIZE
    url = urlsplit(store.presign_put(key, 60))
    slow = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    # Given a write-once PUT whose first half has arrived, the rest still on its way
    slow.putrequest("PUT", f"{url.path}?{url.query}", skip_accept_encoding=True)
    slow.putheader("If-None-Match", "*")
    slow.putheader("Content-Length", str(SIZE))
    slow.endheaders()
    slow.send(slow_body[: SIZE // 2])
    # (its body is being written: the store is past every check it makes first)
    wait_for(
        lambda: (
            folder.is_dir()
            and any(p.name.startswith(localbucket.TEMP_PREFIX) for p in folder.iterdir())
        ),
        10,
        "the slow body to be on its way to disk",
    )
    # When another writer puts the same key, write-once too
    answered: list[bool] = []
    other = threading.Thread(
        target=lambda: answered.append(store.put_if_absent(key, fast_body, sha256_hex(fast_body)))
    )
    other.start()
    other.join(timeout=10)
    # Then it is answered at once: it wrote the object
    assert answered == [True]
    # And the slow one, once its body is in, is refused (412) and changes nothing
    slow.send(slow_body[SIZE // 2 :])
    response = slow.getresponse()
    assert response.status == 412, response.read()
    slow.close()
    assert store.get(key) == fast_body


@pytest.mark.integration
def test_a_write_bound_to_be_refused_stages_nothing(
    store: BlobStore, brokers: EmbeddedBrokers
) -> None:
    """An If-Match on an object that is not there is refused before its body is staged:
    no temporary file, and no folder left behind for a key that does not exist."""
    key = "jobs/refused/in/nothing-here"
    with pytest.raises(ClientError) as refused:
        store._client.put_object(Bucket=store.bucket, Key=key, Body=b"x" * SIZE, IfMatch='"0"')
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert not (brokers.run_dir / "store" / store.bucket / "jobs" / "refused").exists()
