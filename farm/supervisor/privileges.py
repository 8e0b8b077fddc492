"""Drop root privileges: ``setgroups([])``, ``setgid``, then ``setuid`` (for good).

The farm's workers call :func:`drop_privileges` right after the fork, before they load the
handler; the supervisor keeps its identity (to bind new listeners and read TLS keys at a reload)
and calls :func:`check_drop` first, so that a bad ``user``/``group`` fails at boot.
"""

from __future__ import annotations

import grp
import os
import pwd


class PrivilegeError(Exception):
    """The user or group is unknown, or the switch is impossible; ``str()`` is one line."""


def resolve_user(user: str | int) -> tuple[int, int | None]:
    """A user name or numeric id -> ``(uid, primary gid)``; the gid is ``None`` for an id
    that has no passwd entry."""
    text = str(user)
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        if not text.isdigit():
            raise PrivilegeError(f"unknown user {text!r}") from None
        try:
            entry = pwd.getpwuid(int(text))
        except KeyError:
            return int(text), None
    return entry.pw_uid, entry.pw_gid


def resolve_group(group: str | int) -> int:
    """A group name or numeric id -> gid."""
    text = str(group)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise PrivilegeError(f"unknown group {text!r}") from None


def _resolve(user: str | int | None, group: str | int | None) -> tuple[int | None, int | None]:
    uid: int | None = None
    gid: int | None = None
    if user is not None:
        uid, gid = resolve_user(user)
    if group is not None:
        gid = resolve_group(group)
    if uid is not None and gid is None:
        raise PrivilegeError(f"user {user!s} has no passwd entry: give a group as well")
    return uid, gid


def check_drop(user: str | int | None, group: str | int | None) -> None:
    """Raise :class:`PrivilegeError` now if :func:`drop_privileges` with these would fail
    (unknown user or group, not root); the supervisor checks before it forks the workers."""
    if user is None and group is None:
        return
    uid, gid = _resolve(user, group)
    if not _already(uid, gid) and os.geteuid() != 0:
        target = f"user {user!s}" if user is not None else f"group {group!s}"
        raise PrivilegeError(f"cannot switch to {target}: not running as root (uid {os.geteuid()})")


def drop_privileges(user: str | int | None, group: str | int | None) -> None:
    """Become ``user`` (and ``group``, default: the user's primary group) irrevocably.

    A no-op when both are ``None``, or when the process already runs as exactly that user and
    group. Supplementary groups are cleared. Raises :class:`PrivilegeError` for an unknown user
    or group, when not running as root, or when the switch did not stick.
    """
    if user is None and group is None:
        return
    uid, gid = _resolve(user, group)
    target = f"user {user!s}" if user is not None else f"group {group!s}"
    if _already(uid, gid):
        return
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to {target}: not running as root (uid {os.geteuid()})")
    try:
        os.setgroups([])
        if gid is not None:
            os.setgid(gid)  # real, effective and saved gid
        if uid is not None:
            os.setuid(uid)  # real, effective and saved uid: no way back
    except OSError as error:
        raise PrivilegeError(f"cannot switch to {target}: {error}") from None
    if uid not in (None, 0) and _can_regain_root():
        raise PrivilegeError(f"cannot switch to {target}: root could be regained")


def _already(uid: int | None, gid: int | None) -> bool:
    """True if an unprivileged process already has exactly these ids (nothing to do)."""
    return (
        os.geteuid() != 0
        and (uid is None or set(os.getresuid()) == {uid})
        and (gid is None or set(os.getresgid()) == {gid})
    )


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except OSError:
        return False
    return True
