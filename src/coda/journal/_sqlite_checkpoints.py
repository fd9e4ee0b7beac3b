"""The journal's checkpointer: the WAL copied into the database off the commit path.

See "Checkpoints" in `coda.journal.sqlite` for why the writer's own connection
does not checkpoint and how the rounds are paced; `_sqlite_writer.Writer`
starts a `Checkpointer` when it opens the journal and tells it of each commit.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from coda.journal import _sqlite_schema as schema

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)


class Checkpointer:
    """Copies the WAL into the database, on a connection and thread of its own.

    See "Checkpoints" in `coda.journal.sqlite`. The writer calls `committed`
    after each commit, and takes `wanted`, what the checkpointer asks of it:
    None, or the mode of a checkpoint it should run itself between two
    transactions ("PASSIVE" to let the WAL start over, "RESTART" past
    `HARD_FRAMES`).
    """

    # A round that copied more frames than this took long enough for many
    # more to come in: another round follows at once before the writer is
    # asked to finish.
    CATCH_UP_FRAMES = 256
    # The first round waits until the WAL file holds this much (it keeps its
    # size when the WAL starts over, so later rounds go by the pace instead).
    FIRST_ROUND_BYTES = schema.CHECKPOINT_FRAMES * 4096

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self.rounds = 0  # checkpoints that ran
        self.frames = 0  # frames in the WAL, as of the last round
        self.wanted: str | None = None
        self._db = db
        self._done = 0  # frames copied, as of the last round
        self._failure: str | None = None  # the error last logged
        self._commits = threading.Event()  # a commit since the last round
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="coda-journal-checkpointer", daemon=True
        )
        self._thread.start()

    def committed(self) -> None:
        """After a commit; cheap (the writer's thread calls it for every one)."""
        if not self._commits.is_set():
            self._commits.set()

    def stop(self) -> None:
        """Ask the thread to end after its round, without waiting for it."""
        self._closing.set()
        self._commits.set()

    def close(self) -> None:
        """Stop, and wait for the thread (and its connection) to end."""
        self.stop()
        self._thread.join()

    def _run(self) -> None:
        low, high = schema.CHECKPOINT_PAUSES
        pause, last = low, time.monotonic()
        try:
            while True:
                self._commits.wait()
                # Let the WAL grow for a while: a page that many commits
                # rewrite meanwhile is copied once.
                if self._closing.wait(pause):
                    return
                self._commits.clear()
                if self._closing.is_set():
                    # `stop` came between the wait and the clear, which wiped
                    # its wake-up: waiting for a commit now would be for ever.
                    return
                if self.rounds == 0 and self._wal_bytes() < self.FIRST_ROUND_BYTES:
                    # Nothing worth copying yet: a journal that takes a burst
                    # and then rests is checkpointed when it closes, without
                    # fsyncs of the database while the burst is written.
                    continue
                before = self.frames
                again = self._round()
                grown = self.frames - before if self.frames >= before else self.frames
                while again and not self._closing.is_set():
                    again = self._round()
                # The next round once about CHECKPOINT_FRAMES more have come,
                # at the pace they came since the last round, within bounds:
                # each round costs an fsync of the database, which the
                # writer's fsyncs of the WAL wait behind.
                now = time.monotonic()
                rate = grown / max(now - last, 1e-3)
                last = now
                pause = schema.CHECKPOINT_FRAMES / rate if rate > 0 else high
                pause = min(max(pause, low), high)
        finally:
            self._db.close()

    def _wal_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    def _round(self) -> bool:
        """One PASSIVE checkpoint; whether another should follow at once."""
        try:
            ((busy, frames, done),) = self._db.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchall()
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        except Exception:
            logger.exception("checkpointing journal %s failed unexpectedly", self.path)
            return False
        self.rounds += 1
        if not busy:
            self.frames = frames
        if self._failure is not None:
            logger.info("checkpoints of journal %s succeed again", self.path)
            self._failure = None
        # Fewer frames copied than last time: the WAL started over meanwhile.
        copied = done - self._done if done >= self._done else done
        self._done = done
        logger.debug(
            "checkpoint of journal %s: %d of %d WAL frames copied%s",
            self.path,
            done,
            frames,
            " (busy)" if busy else "",
        )
        if busy or frames < schema.RESTART_FRAMES:
            return False
        if copied > self.CATCH_UP_FRAMES:
            return True
        if frames >= schema.HARD_FRAMES:
            logger.warning(
                "the WAL of journal %s holds %d frames (%d MB), past %d: readers "
                "holding old snapshots keep it from starting over; the writer "
                "waits up to %gs for them before its next transaction",
                self.path,
                frames,
                frames * 4096 // 1_000_000,
                schema.HARD_FRAMES,
                schema.BUSY_TIMEOUT,
            )
            self.wanted = "RESTART"
        else:
            self.wanted = "PASSIVE"
        return False

    def _failed(self, exc: sqlite3.Error) -> None:
        """Log a failed round; the same error again only at debug."""
        text = str(exc)
        if text == self._failure:
            logger.debug("checkpoint of journal %s failed again: %s", self.path, exc)
            return
        self._failure = text
        logger.error(
            "checkpoint of journal %s failed (%s): appends go on, their events "
            "stay in the WAL, which grows until a checkpoint succeeds; check the "
            "disk and the free space on %s",
            self.path,
            exc,
            self.path.absolute().parent,
        )
