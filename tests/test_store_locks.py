# SPDX-License-Identifier: Apache-2.0
"""The embedded store's per-object locks: they serialise one object's conditional
writes, and are forgotten once no one holds or waits for them."""

from __future__ import annotations

import threading
import time

import pytest

from parkpool.broker_config.store_locks import KeyLocks


def test_one_keys_holders_wait_for_each_other_and_leave_nothing_behind() -> None:
    locks = KeyLocks()
    order: list[str] = []
    waiting = threading.Event()

    def second() -> None:
        waiting.set()
        with locks.hold(("b", "k")):
            order.append("second")

    with locks.hold(("b", "k")):
        thread = threading.Thread(target=second)
        thread.start()
        waiting.wait(5)
        time.sleep(0.2)  # time for the second to get in, were it able to
        order.append("first")
        assert len(locks) == 1  # the waiter keeps the key's one lock alive
    thread.join(5)
    assert order == ["first", "second"]
    assert len(locks) == 0


def test_other_keys_do_not_wait() -> None:
    locks = KeyLocks()
    with locks.hold(("b", "one")):
        done = threading.Event()

        def other() -> None:
            with locks.hold(("b", "two")):
                done.set()

        threading.Thread(target=other).start()
        assert done.wait(5)
        assert len(locks) >= 1
    assert len(locks) == 0


def test_a_holder_that_raises_still_lets_go() -> None:
    locks = KeyLocks()
    with pytest.raises(RuntimeError), locks.hold("k"):
        raise RuntimeError("write failed")
    assert len(locks) == 0
    with locks.hold("k"):  # and the key can be taken again
        assert len(locks) == 1
