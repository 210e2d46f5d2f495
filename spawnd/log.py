"""spawnd's log: one line per event on stderr, prefixed with its level.

Under systemd (JOURNAL_STREAM set and stderr being that stream) the prefix is the
sd-daemon priority (<3>, <4>, <6>, <7>) so journald records the level; otherwise it is a
word ("error:", "warning:", ...). Children's lines are forwarded as "pool[pid]: text".
"""
from __future__ import annotations

import os


class Log:
    ERROR, WARNING, INFO, DEBUG = 3, 4, 6, 7
    _WORDS = {3: "error", 4: "warning", 6: "info", 7: "debug"}

    def __init__(self) -> None:
        self.level = self.INFO
        self.fd = 2
        self.journal = _stderr_is_journal()

    def log(self, level: int, message: str) -> None:
        if level > self.level:
            return
        prefix = f"<{level}>" if self.journal else f"{self._WORDS[level]}: "
        self.write(prefix + message)

    def write(self, text: str) -> None:
        """Write one or more lines (text without the final newline) in one go.

        Straight to fd 2 with os.write, looping over partial writes: a write to a full
        pipe that a signal (SIGCHLD) interrupts returns short, and going through
        sys.stderr's buffered layers lost the rest of the batch silently."""
        data = memoryview((text + "\n").encode("utf-8", "replace"))
        while data:
            try:
                n = os.write(self.fd, data)
            except OSError:
                return              # stderr gone: nothing useful left to do
            data = data[n:]

    def error(self, message: str) -> None:
        self.log(self.ERROR, message)

    def warning(self, message: str) -> None:
        self.log(self.WARNING, message)

    def info(self, message: str) -> None:
        self.log(self.INFO, message)

    def debug(self, message: str) -> None:
        self.log(self.DEBUG, message)

    def child_lines(self, pool: str, pid: int, lines: list[str]) -> None:
        """Forward lines a child wrote, each as "pool[pid]: text", in one write."""
        prefix = f"<6>{pool}[{pid}]: " if self.journal else f"{pool}[{pid}]: "
        self.write(prefix + ("\n" + prefix).join(lines))


def _stderr_is_journal() -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


log = Log()
