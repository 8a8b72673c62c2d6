"""Who holds a running step on SQLite, and whether that owner still lives.

On PostgreSQL the owner is the claiming connection's session (store/postgres.py asks
the server whether that backend still exists). A SQLite store is a local file,
so its workers share this host: the owner is ``host:pid:thread`` and is looked
up here. An owner on another host cannot be seen: it counts as alive, and the
lease (``WorkflowStore.step_lease_s``) bounds how long.
"""

from __future__ import annotations

import os
import socket
import threading


def local_owner() -> str:
    """This process and thread, as a SQLite step owner: ``host:pid:thread``."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def local_owner_alive(owner: str) -> bool:
    """Whether the SQLite step owner ``host:pid:thread`` may still be running it.
    Another host cannot be looked at: alive (the lease decides)."""
    try:
        host, pid_text, thread_text = owner.rsplit(":", 2)
        pid, thread = int(pid_text), int(thread_text)
    except ValueError:
        return False  # not an owner this code wrote: unknown, as before owners existed
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        others = (t.ident for t in threading.enumerate() if t.ident != threading.get_ident())
        return thread in others
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
