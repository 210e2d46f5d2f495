"""The few ptrace(2) requests spawnd uses to retire a busy child without cutting a request.

A child that serves requests back to back is never seen waiting in accept(): the listen
queue always holds the next connection. To retire it exactly between two requests, spawnd
seizes it and follows its system calls; at the entry of its next accept() on fd 0 (the
call has not run, so no connection has been taken) the child is killed. Only the child
being retired is traced, only until then.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct

PTRACE_SYSCALL = 24
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_DETACH = 17
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_EXITKILL = 0x100000      # if spawnd dies, the child it was retiring dies too
PTRACE_EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80
INFO_ENTRY = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_INFO_SIZE = 88


def _call(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    r = _libc.ptrace(request, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if r == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def seize_and_interrupt(pid: int) -> None:
    """Attach to pid (no stop yet) and ask it to stop; the stop arrives through waitpid
    as a PTRACE_EVENT_STOP. Raises OSError when tracing is not allowed."""
    _call(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL)
    _call(PTRACE_INTERRUPT, pid)


def resume(pid: int, sig: int = 0) -> None:
    """Continue until the next system call entry or exit (delivering sig, if any)."""
    _call(PTRACE_SYSCALL, pid, 0, sig)


def detach(pid: int) -> None:
    """Let a stopped tracee go (one no pool claims any more)."""
    try:
        _call(PTRACE_DETACH, pid)
    except OSError:
        pass


def syscall_entry(pid: int) -> tuple[int, int] | None:
    """(number, first argument) when pid is stopped at a system call's entry, else None."""
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    _call(PTRACE_GET_SYSCALL_INFO, pid, _INFO_SIZE, ctypes.addressof(buf))
    if buf.raw[0] != INFO_ENTRY:
        return None
    return struct.unpack_from("QQ", buf.raw, 24)


def is_event_stop(status: int) -> bool:
    return status >> 16 == PTRACE_EVENT_STOP


def is_syscall_stop(status: int) -> bool:
    return os.WIFSTOPPED(status) and os.WSTOPSIG(status) == SYSCALL_STOP
