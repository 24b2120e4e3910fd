"""mmcli.workers.WorkerPool: a worker that died while idle is replaced, not fed."""

import multiprocessing
import os
import signal
import sys

import pytest

from mmcli.workers import WorkerPool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers")


def _echo(conn):
    conn.send(("ready", None))
    while (payload := conn.recv()) is not None:
        conn.send(("rows", payload))


def _answer(pool, job, payload):
    pool.submit(job, payload, 30)
    return pool.wait()


@pytest.mark.parametrize("seen_alive", [False, True], ids=["reaped", "not-yet-reaped"])
def test_an_idle_worker_that_died_is_replaced(seen_alive):
    pool = WorkerPool(multiprocessing.get_context("fork"), 1, _echo, ())
    try:
        assert _answer(pool, "j1", 1) == [("j1", "answer", ("rows", 1))]
        first = pool.slots[0].process
        os.kill(first.pid, signal.SIGKILL)  # e.g. the out-of-memory killer, between two jobs
        first.join(10)
        if seen_alive:  # its death not noticed yet: the send to it fails
            first.is_alive = lambda: True
        assert _answer(pool, "j2", 2) == [("j2", "answer", ("rows", 2))]
        assert len(pool.slots) == 1 and pool.slots[0].process is not first
    finally:
        pool.close(clean=True)
    assert not multiprocessing.active_children()
