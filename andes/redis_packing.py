"""redis-py's asyncio connection, with commands packed by hiredis's C packer.

redis-py packs commands with hiredis only on its synchronous connections; its asyncio ones
pack every argument in Python: 8.6 us for a worker's typical XADD (stream key, MAXLEN, three
fields) against 2.1 us with ``hiredis.pack_command`` (measured here). A worker sends an XADD
per stream per publish and a gateway an XREAD naming hundreds of keys, so the packer was a
seventh of a busy sim worker's CPU. Pass ``connection_class=HiredisPackedConnection`` to a
client or pool made ``from_url``: a ``redis://`` URL uses it, while ``rediss://`` and
``unix://`` URLs choose their own connection classes as before.

It also names its client library once for every connection (``CLIENT SETINFO``): redis-py
otherwise reads its own package metadata for each new connection, 360 us of CPU each
(measured here), paid at the worst time, when a burst makes a pool open hundreds.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.connection import HiredisRespSerializer
from redis.driver_info import DriverInfo

DRIVER_INFO = DriverInfo(name="redis-py", lib_version=redis.__version__)
"""What redis-py would report, known without reading package metadata."""


class HiredisPackedConnection(redis.asyncio.Connection):
    """A TCP connection whose commands hiredis packs: redis-py's own serializer for its
    synchronous connections (same bytes as its Python packer, DataError for what it cannot
    pack)."""

    _packer = HiredisRespSerializer()

    def __init__(self, **kwargs: Any) -> None:
        if not {"driver_info", "lib_name", "lib_version"} & kwargs.keys():
            kwargs["driver_info"] = DRIVER_INFO
        super().__init__(**kwargs)

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed
