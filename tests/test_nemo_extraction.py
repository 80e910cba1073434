"""A .nemo tar opened by several processes at once (the ranks of one node) is extracted once and removed by the
last one to close it; a crashed process does not keep it forever; a failed extraction leaves nothing behind."""
import multiprocessing as mp
import os
import time

import pytest

from conftest import FIXTURES
from nemotron.checkpoint import nemo
from nemotron.checkpoint.shards import CheckpointError

RANKS = 3


def _open_together(archive: str, rank: int, barrier_dir: str, out) -> None:
    """Open the archive, wait until every rank holds it open, report what it saw, close."""
    with nemo.open_nemo(archive) as ck:
        config = os.path.join(ck.root, nemo.CONFIG_FILE)
        open(os.path.join(barrier_dir, str(rank)), "w").close()
        deadline = time.time() + 60
        while len(os.listdir(barrier_dir)) < RANKS and time.time() < deadline:
            time.sleep(0.02)
        out.put((rank, ck.root, os.stat(config).st_ino, len(os.listdir(barrier_dir))))
        time.sleep(0.2)  # still open while the others report


def _entries(home: str) -> set:
    return set(os.listdir(home))


@pytest.fixture
def archive(tmp_path):
    path = str(tmp_path / "tiny.nemo")
    nemo.pack_nemo(os.path.join(FIXTURES, "tiny_tp2_zarr"), path)
    return path


def test_ranks_share_one_extraction_and_the_last_removes_it(archive, tmp_path):
    home = nemo._extraction_home()
    before = _entries(home)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_together, args=(archive, r, str(barrier), out)) for r in range(RANKS)]
    for p in procs:
        p.start()
    seen = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(n == RANKS for *_, n in seen), "every rank held the archive open at the same time"
    assert len({root for _, root, _, _ in seen}) == 1 and len({ino for _, _, ino, _ in seen}) == 1, \
        f"one extraction, shared: {seen}"
    assert _entries(home) == before, "the last rank to close removed the extraction"


def test_a_crashed_user_does_not_pin_the_extraction(archive):
    home = nemo._extraction_home()
    before = _entries(home)
    ck = nemo.open_nemo(archive)
    users = ck.root + ".users"  # the fixture's archive holds model_config.yaml at its top: root is the extraction
    # A process that registered and then died without closing: its pid no longer exists.
    dead = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    open(os.path.join(users, f"{os.uname().nodename}@{dead.pid}.deadbeef"), "w").close()
    ck.close()
    assert _entries(home) == before


def test_a_failed_extraction_leaves_nothing(tmp_path):
    home = nemo._extraction_home()
    before = _entries(home)
    archive = tmp_path / "tiny.nemo"
    nemo.pack_nemo(os.path.join(FIXTURES, "tiny_tp2_zarr"), str(archive))
    with open(archive, "r+b") as f:  # truncated mid-member
        f.truncate(os.path.getsize(archive) // 2)
    with pytest.raises(CheckpointError, match="tiny.nemo"):
        nemo.open_nemo(str(archive))
    assert _entries(home) == before
