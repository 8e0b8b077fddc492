"""A lock shared by the supervisor and every worker forked after it was made, that a process
killed while holding it does not leave locked.

It is a POSIX mutex in shared memory, process-shared and *robust* (``pthread_mutexattr_setrobust``,
called through ``ctypes``): taking and releasing it costs no system call unless another
process holds it, and when its holder dies (even by SIGKILL) the kernel marks it so that the
next taker gets ``EOWNERDEAD``, marks it consistent and goes on. Where that is not available,
an ``fcntl`` lock on a ``memfd`` does the same job with two system calls per use (the kernel
drops a dead process's ``fcntl`` locks too).

Must be created before the fork (the memory is shared by inheritance), and never held across
a fork.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os

__all__ = ["SharedLock"]

log = logging.getLogger("farm.anvil")

#: Octets reserved for a ``pthread_mutex_t`` (40 on x86_64 glibc) and its attributes.
_MUTEX_SIZE = 64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


class SharedLock:
    """``acquire()`` / ``release()``; ``kind`` says which mechanism it uses."""

    def __init__(self) -> None:
        self.kind = "mutex"
        try:
            self._init_mutex()
        except (OSError, AttributeError, ValueError) as error:
            log.debug("no robust process-shared mutex (%s): using an fcntl lock", error)
            self._init_fcntl()

    # -- a robust, process-shared pthread mutex --------------------------------------------------

    def _init_mutex(self) -> None:
        path = ctypes.util.find_library("c")
        if not path:
            raise OSError("no C library found")
        libc = ctypes.CDLL(path, use_errno=True)
        self._memory = mmap.mmap(-1, 2 * _MUTEX_SIZE)  # MAP_SHARED | MAP_ANONYMOUS
        self._buffer = (ctypes.c_char * (2 * _MUTEX_SIZE)).from_buffer(self._memory)
        self._address = ctypes.addressof(self._buffer)
        attributes = ctypes.c_void_p(self._address + _MUTEX_SIZE)
        for call, arguments in (
            (libc.pthread_mutexattr_init, (attributes,)),
            (libc.pthread_mutexattr_setpshared, (attributes, _PTHREAD_PROCESS_SHARED)),
            (libc.pthread_mutexattr_setrobust, (attributes, _PTHREAD_MUTEX_ROBUST)),
            (libc.pthread_mutex_init, (ctypes.c_void_p(self._address), attributes)),
        ):
            code = call(*arguments)
            if code:
                raise OSError(code, os.strerror(code))
        self._lock = libc.pthread_mutex_lock
        self._unlock = libc.pthread_mutex_unlock
        self._consistent = libc.pthread_mutex_consistent
        for function in (self._lock, self._unlock, self._consistent):
            function.argtypes = [ctypes.c_void_p]
            function.restype = ctypes.c_int
        self.acquire = self._acquire_mutex  # type: ignore[method-assign]
        self.release = self._release_mutex  # type: ignore[method-assign]

    def _acquire_mutex(self) -> None:
        code = self._lock(self._address)
        if code == errno.EOWNERDEAD:  # its holder died: what it guarded may be half-done
            self._consistent(self._address)
        elif code:
            raise OSError(code, os.strerror(code))

    def _release_mutex(self) -> None:
        self._unlock(self._address)

    # -- the fallback: fcntl on a memfd ---------------------------------------------------------

    def _init_fcntl(self) -> None:
        self.kind = "fcntl"
        self._fd = os.memfd_create("farm-lock", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, 1)
        self.acquire = self._acquire_fcntl  # type: ignore[method-assign]
        self.release = self._release_fcntl  # type: ignore[method-assign]

    def _acquire_fcntl(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _release_fcntl(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def acquire(self) -> None:  # replaced in __init__
        raise NotImplementedError

    def release(self) -> None:  # replaced in __init__
        raise NotImplementedError
