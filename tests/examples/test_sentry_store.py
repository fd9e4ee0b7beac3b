"""The Sentry example's SQLite store: idempotent under redelivery, safe to share."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sentry_app import BUNDLED_DATA, load_events, normalize, store_event, summary
from sentry_app.store import connect, list_groups

EVENTS = [normalize(e, p) for e, p in load_events(BUNDLED_DATA / "python-sdk.jsonl")]
# Group sizes of python-sdk.jsonl, from its README (see test_sentry_logic.py).
GROUP_SIZES = sorted([3, 4, 1, 2, 1, 3, 3, 2, 2, 1, 2, 1, 1, 2, 2, 2, 1, 2, 2, 2, 1])


@pytest.fixture
def db(tmp_path):
    return tmp_path / "sentry.sqlite3"


def test_storing_the_40_lines_makes_21_groups(db):
    results = [store_event(db, 1, event, received_at=1000.0) for event in EVENTS]
    assert summary(db) == {"events": 40, "groups": 21, "times_seen": 40}
    assert sorted(g["times_seen"] for g in list_groups(db)) == GROUP_SIZES
    # Exactly the first event of each group opened it.
    opened = [i for i, r in enumerate(results) if r["new_group"]]
    assert opened == [0, 3, 7, 8, 10, 11, 14, 17, 19, 20, 22, 24, 25, 26, 28, 30, 32,
                      33, 35, 37, 39]  # fmt: skip
    assert [r["times_seen"] for r in results[:7]] == [1, 2, 3, 1, 2, 3, 4]
    assert {r["event_id"] for r in results} == {e["event_id"] for e in EVENTS}


def test_storing_an_event_again_changes_nothing(db):
    first = store_event(db, 1, EVENTS[0])
    assert first == {
        "event_id": EVENTS[0]["event_id"],
        "group_id": first["group_id"],
        "new_group": True,
        "times_seen": 1,
    }
    assert store_event(db, 1, EVENTS[0]) == first
    store_event(db, 1, EVENTS[1])
    # A late redelivery of the group's first event still says it opened the group,
    # and reports the group's count as it is now.
    again = store_event(db, 1, EVENTS[0])
    assert again == {**first, "times_seen": 2}
    assert summary(db) == {"events": 2, "groups": 1, "times_seen": 2}


def test_redelivering_everything_does_not_double_count(db):
    for event in EVENTS:
        store_event(db, 1, event)
    before = list_groups(db)
    for event in reversed(EVENTS):
        result = store_event(db, 1, event)
        assert result["times_seen"] == next(
            g["times_seen"] for g in before if g["group_id"] == result["group_id"]
        )
    assert list_groups(db) == before
    assert summary(db) == {"events": 40, "groups": 21, "times_seen": 40}


def test_projects_do_not_share_events_or_groups(db):
    store_event(db, 1, EVENTS[0])
    other = store_event(db, 2, EVENTS[0])
    assert other["new_group"] is True and other["times_seen"] == 1
    assert summary(db) == {"events": 2, "groups": 2, "times_seen": 2}
    assert [g["project_id"] for g in list_groups(db, 2)] == [2]


def test_group_seen_times_come_from_event_timestamps(db):
    received = 5.0
    for event in (EVENTS[1], EVENTS[0], EVENTS[2]):
        store_event(db, 1, event, received_at=received)
    (group,) = list_groups(db)
    assert group["first_seen"] == EVENTS[0]["timestamp"]
    assert group["last_seen"] == EVENTS[2]["timestamp"]
    assert group["title"] == "ZeroDivisionError: division by zero"

    no_timestamp = normalize({"message": "no clock here"})
    store_event(db, 1, no_timestamp, received_at=received)
    assert [g["first_seen"] for g in list_groups(db) if g["times_seen"] == 1] == [5.0]


def test_the_stored_row_holds_the_event(db):
    event = EVENTS[28]
    result = store_event(db, 7, event, received_at=42.0)
    with connect(db) as conn:
        row = conn.execute(
            "SELECT group_id, received, timestamp, platform, level, title, payload"
            " FROM events WHERE project_id = 7 AND event_id = ?",
            (event["event_id"],),
        ).fetchone()
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    assert row[:6] == (
        result["group_id"],
        42.0,
        event["timestamp"],
        "python",
        "error",
        "AttributeError: 'NoneType' object has no attribute 'email'",
    )
    assert json.loads(row[6]) == event
    assert mode == "wal"


def test_unnormalized_events_are_refused(db):
    with pytest.raises(ValueError, match=r"normalize\(\)"):
        store_event(db, 1, {"message": "raw, no id"})
    with pytest.raises(ValueError, match="32 lowercase hex"):
        store_event(db, 1, {"event_id": "3882F0CD-6FCF-4B16-B941-7CE61F8BFB13"})
    assert summary(db) == {"events": 0, "groups": 0, "times_seen": 0}


def test_a_writer_waits_for_a_busy_database_instead_of_failing(db):
    summary(db)  # create the file
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    results = []
    writer = threading.Thread(
        target=lambda: results.append(store_event(db, 1, EVENTS[0]))
    )
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive() and results == []  # blocked on the write lock
    blocker.execute("COMMIT")
    blocker.close()
    writer.join(timeout=10)
    assert results and results[0]["times_seen"] == 1


def _deliver_all(db, seed, barrier, results):
    order = list(EVENTS)
    random.Random(seed).shuffle(order)
    barrier.wait()  # all processes open the fresh file at the same moment
    try:
        results.put([store_event(db, 1, event) for event in order])
    except Exception as exc:
        results.put(repr(exc))


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_processes_storing_overlapping_events(tmp_path, attempt):
    # Six processes each deliver all 40 events, in their own order, racing from
    # the first open of a fresh file: 240 deliveries of 40 events. (Opening a
    # fresh file together is where SQLite refuses the switch to WAL mode without
    # waiting; three fresh files make that race likely to show.)
    db = tmp_path / f"race-{attempt}.sqlite3"
    fork = multiprocessing.get_context("fork")
    barrier, queue = fork.Barrier(6), fork.Queue()
    workers = [
        fork.Process(target=_deliver_all, args=(db, seed, barrier, queue))
        for seed in range(6)
    ]
    for worker in workers:
        worker.start()
    outcomes = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)

    assert [o for o in outcomes if not isinstance(o, list)] == []
    assert summary(db) == {"events": 40, "groups": 21, "times_seen": 40}
    assert sorted(g["times_seen"] for g in list_groups(db)) == GROUP_SIZES
    # Every delivery of an event agrees on its group and on whether it opened it,
    # and each group was opened by exactly one event.
    answers = {
        (r["event_id"], r["group_id"], r["new_group"]) for o in outcomes for r in o
    }
    assert len(answers) == 40
    openers = Counter(group for _, group, new in answers if new)
    assert len(openers) == 21 and set(openers.values()) == {1}


def test_writers_queue_on_the_lock_file_beside_the_store(db):
    # Another process's writer holds the lock file: a store waits for it (in
    # the kernel's queue, not in SQLite's sleeping busy handler) and goes on
    # as soon as it is let go.
    summary(db)
    holder = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    results = []
    writer = threading.Thread(
        target=lambda: results.append(store_event(db, 1, EVENTS[0]))
    )
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive() and results == []
    assert summary(db)["events"] == 0
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    writer.join(timeout=10)
    assert results and results[0]["times_seen"] == 1


def test_a_store_whose_lock_file_cannot_be_made_still_writes(db, monkeypatch):
    # A folder where the lock file cannot be created (its permissions, or a
    # file of that name owned by someone else): writers fall back to SQLite's
    # busy handler alone, and store as before.
    summary(db)
    real_open = os.open

    def refuse_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_lock_files)
    results = []
    # A thread of its own: this thread may have the lock file open already.
    writer = threading.Thread(
        target=lambda: results.append(store_event(db, 1, EVENTS[0]))
    )
    writer.start()
    writer.join(timeout=10)
    assert results and results[0]["times_seen"] == 1
    assert not Path(f"{db}.lock").exists()
