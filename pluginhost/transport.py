"""A kombu filesystem transport that never hands a consumer a half-written message.

kombu's ``filesystem://`` transport creates a message file in the queue folder and
then writes it, so a polling consumer can take the file in between, fail with
``JSONDecodeError`` and lose the message (kombu issue #1551). Here a message is
written under a temporary name that no consumer matches and ``os.replace``-d into
place; a consumer claims a file by renaming it within the queue folder (kombu moves
it to the system temp folder: a copy, not a claim, across filesystems); an exchange
table appears complete or not at all; and declared bindings are remembered per
control folder rather than per process. Importing this module registers the
transport as ``pluginhost-fs://``; file names, ordering and options are kombu's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any, ClassVar

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import filesystem as _kombu_fs
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

__all__ = ["ALIAS", "FilesystemChannel", "FilesystemTransport"]

ALIAS = "pluginhost-fs"

# Consumers only take names whose part after the first dot is "<queue>.msg"; a name
# ending in ".tmp" can never match, and the leading dot hides it from people too.
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"


def _message_name(queue: str) -> str:
    # kombu's scheme: "<monotonic ms>_<uuid4>.<queue>.msg", sorted by name to consume.
    return f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"


def _write_atomically(path: str, data: bytes) -> None:
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f"{_TEMP_PREFIX}{name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


class FilesystemChannel(_kombu_fs.Channel):
    """Filesystem channel with atomic puts, claims and exchange-table creation."""

    # kombu's filesystem Channel already names the argument differently from its base
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` onto ``queue``; kombu's fan-out put calls this per queue."""
        filename = os.path.join(self.data_folder_out, _message_name(queue))
        try:
            _write_atomically(filename, str_to_bytes(dumps(payload)))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {filename!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """Take the oldest message of ``queue``; only one consumer can win a file."""
        queue_find = f"{queue}.msg"
        folder = self.data_folder_in
        for filename in sorted(os.listdir(folder)):
            if filename.partition(".")[2] != queue_find:
                continue
            claimed = os.path.join(folder, f"{_TEMP_PREFIX}{filename}.{uuid.uuid4().hex}.claimed")
            try:
                os.rename(os.path.join(folder, filename), claimed)
            except OSError:
                continue  # another consumer took it first
            try:
                with open(claimed, "rb") as f:
                    payload = f.read()
                if self.store_processed:
                    shutil.move(claimed, os.path.join(self.processed_folder, filename))
                else:
                    os.remove(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        # kombu creates a missing table with open("wb") and writes it afterwards: a
        # concurrent reader can parse the empty file, and two processes binding at
        # once truncate each other's entry. Creating it with "[]" by a hard link makes
        # it appear complete or not at all; kombu's locked update does the rest.
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            _create_with_content(file, str_to_bytes(dumps([])))
        super()._queue_bind(exchange, routing_key, pattern, queue)


def _create_with_content(file: Path, data: bytes) -> None:
    temp = file.with_name(f"{_TEMP_PREFIX}{file.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        temp.write_bytes(data)
        os.link(temp, file)
    except FileExistsError:
        pass  # another process created it first
    except OSError:
        pass  # no hard links here: kombu creates the file as it always has
    finally:
        temp.unlink(missing_ok=True)


class FilesystemTransport(_kombu_fs.Transport):
    """kombu's filesystem transport with :class:`FilesystemChannel`."""

    Channel = FilesystemChannel
    _states: ClassVar[dict[str, virtual.BrokerState]] = {}

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        # kombu keeps one declared-bindings state per process and skips writing a
        # binding it has seen, even into another control folder: a process that used
        # one data folder would route messages to nowhere in the next. One state per
        # control folder keeps the sharing without that.
        control = os.path.abspath(client.transport_options.get("control_folder", "control"))
        self.state = self._states.setdefault(control, virtual.BrokerState())

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # a folder has no host: kombu's "localhost" default only logs a warning per
        # connection ("No hostname was supplied")
        return {"port": self.default_port}


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:FilesystemTransport"
