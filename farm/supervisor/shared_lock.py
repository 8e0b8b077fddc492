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
import functools
import logging
import mmap
import os
from collections.abc import Callable

__all__ = ["SharedLock"]

log = logging.getLogger("farm.anvil")

#: Octets reserved for a ``pthread_mutex_t`` (40 on x86_64 glibc) and its attributes.
_MUTEX_SIZE = 64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


class SharedLock:
    """``acquire()`` / ``release()`` (or ``take()`` and :meth:`settle`); ``kind`` says which
    mechanism it uses."""

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
        # No use_errno: the pthread calls return their error. Two views of the C library:
        # the calls that cannot wait (trylock, unlock) keep the GIL (PyDLL: no release and
        # re-take per call); the one that may wait (lock, when trylock found the mutex busy)
        # releases it (CDLL), so that a thread of this process holding the lock can finish.
        libc = ctypes.CDLL(path)
        quick = ctypes.PyDLL(path)
        self._memory = mmap.mmap(-1, 2 * _MUTEX_SIZE)  # MAP_SHARED | MAP_ANONYMOUS
        # The mutex and its attributes as ctypes arrays: each is passed as a pointer to its
        # memory as it is, the cheapest argument ctypes knows (no conversion per call).
        self._mutex = (ctypes.c_char * _MUTEX_SIZE).from_buffer(self._memory)
        attributes = (ctypes.c_char * _MUTEX_SIZE).from_buffer(self._memory, _MUTEX_SIZE)
        for call, arguments in (
            (libc.pthread_mutexattr_init, (attributes,)),
            (libc.pthread_mutexattr_setpshared, (attributes, _PTHREAD_PROCESS_SHARED)),
            (libc.pthread_mutexattr_setrobust, (attributes, _PTHREAD_MUTEX_ROBUST)),
            (libc.pthread_mutex_init, (self._mutex, attributes)),
        ):
            code = call(*arguments)
            if code:
                raise OSError(code, os.strerror(code))
        self._lock = libc.pthread_mutex_lock
        self._consistent = libc.pthread_mutex_consistent
        try_lock, unlock = quick.pthread_mutex_trylock, quick.pthread_mutex_unlock
        for function in (self._lock, self._consistent, try_lock, unlock):
            function.restype = ctypes.c_int
        # The C functions themselves, no Python frame in between.
        self.take = functools.partial(try_lock, self._mutex)
        self.release = functools.partial(unlock, self._mutex)  # type: ignore[method-assign]

    # -- the fallback: fcntl on a memfd ---------------------------------------------------------

    def _init_fcntl(self) -> None:
        self.kind = "fcntl"
        self._fd = os.memfd_create("farm-lock", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, 1)
        self.take = functools.partial(fcntl.lockf, self._fd, fcntl.LOCK_EX)
        self.release = functools.partial(fcntl.lockf, self._fd, fcntl.LOCK_UN)  # type: ignore[method-assign]

    # -- the interface ----------------------------------------------------------------------------

    #: Takes the lock if it is free, and returns what :meth:`settle` must then be given when it
    #: is neither 0 nor None (settle waits for a busy lock): ``if code := take(): settle(code)``
    #: holds the lock, for a caller on a hot path with no Python frame; set in ``__init__``.
    take: Callable[[], int | None]

    def settle(self, code: int) -> None:
        """``take`` returned ``code``: the mutex is busy (wait for it), or its holder died (what
        the lock guarded may be half-done, and it is ours now); any other code is an error."""
        if code == errno.EBUSY:  # (the mutex's only: trylock found it held)
            code = self._lock(self._mutex)
            if not code:
                return
        if code == errno.EOWNERDEAD:
            self._consistent(self._mutex)
        else:
            raise OSError(code, os.strerror(code))

    def acquire(self) -> None:
        code = self.take()
        if code:
            self.settle(code)

    def release(self) -> None:  # replaced in __init__
        raise NotImplementedError
