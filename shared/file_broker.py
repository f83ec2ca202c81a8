"""The embedded broker: kombu's filesystem transport, with messages written atomically.

kombu creates a message file and then writes it, so a consumer polling fast can read it empty and
die on the JSON ("Unrecoverable error: JSONDecodeError"). Here each message is written under a
hidden temporary name and renamed into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "llmq-files"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(temporary, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add message file {final!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
    global_state = filesystem.virtual.BrokerState()  # type: ignore[no-untyped-call]


def register() -> None:
    """Makes llmq-files:// a broker URL Celery understands."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
