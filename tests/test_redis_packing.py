"""andes.redis_packing against a real Redis: the same bytes as redis-py's packer, and commands
that work end to end."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis.asyncio as aioredis
from redis.driver_info import DriverInfo
from redis.exceptions import DataError

from andes.redis_packing import HiredisPackedConnection

COMMANDS = [
    ("XADD", b"k", "MAXLEN", "~", 1000, "*", b"i", b"12", b"t", b"\x01\x00\x00\x00", b"x", "é "),
    ("XREAD", "COUNT", 256, "BLOCK", 1000, "STREAMS", "a", "b", b"0-0", "1-2"),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", "andes"),
    ("SET", "k", 1.5),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_packs_the_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    ours = HiredisPackedConnection().pack_command(*args)
    theirs = aioredis.Connection().pack_command(*args)
    assert b"".join(ours) == b"".join(theirs)


def test_unpackable_arguments_are_data_errors() -> None:
    with pytest.raises(DataError):
        HiredisPackedConnection().pack_command("SET", "k", None)


def test_stream_commands_round_trip_through_redis(redis_url: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url, connection_class=HiredisPackedConnection)
        key = f"test:redis-packing:{os.getpid()}"
        try:
            pipe = client.pipeline(transaction=False)
            for i in range(3):
                pipe.xadd(key, {b"i": str(i).encode(), b"x": "é".encode()}, maxlen=100)
            await pipe.execute()
            reply = await client.xread({key: "0-0"}, count=10, block=100)
            assert [fields[b"i"] for _, fields in reply[0][1]] == [b"0", b"1", b"2"]
            assert reply[0][1][0][1][b"x"] == "é".encode()
            connection = await client.connection_pool.get_connection()
            assert isinstance(connection, HiredisPackedConnection)
            await client.connection_pool.release(connection)
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(run())


def test_connections_name_the_client_library_as_redis_py_would() -> None:
    """Without reading package metadata per connection (a pool opens hundreds in a burst)."""
    default = aioredis.Connection().driver_info
    ours = HiredisPackedConnection().driver_info
    assert default is not None and ours is not None
    assert (ours.name, ours.lib_version) == (default.name, default.lib_version)
    mine = DriverInfo(name="mine", lib_version="1")
    assert HiredisPackedConnection(driver_info=mine).driver_info is mine
