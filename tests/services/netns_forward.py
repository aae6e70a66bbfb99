#!/usr/bin/env python3
"""Forward TCP from 127.0.0.1 of this network namespace into another one.

    netns_forward.py NETNS PORT

Listens on 127.0.0.1:<ephemeral> here (prints the port on stdout), then
enters NETNS (setns on /run/netns/NETNS; the listening socket stays where it
was made) and forwards each connection to 127.0.0.1:PORT inside NETNS.  The
PXE tests run the agent inside a namespace (so that its DHCP interface, a
bridge with test addresses, exists only there) and reach its API through this.
"""

import asyncio
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def _serve(listener: socket.socket, port: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
        w.close()
        uw.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()


def main() -> None:
    netns, port = sys.argv[1], int(sys.argv[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    os.close(fd)
    print(listener.getsockname()[1], flush=True)
    asyncio.run(_serve(listener, port))


if __name__ == "__main__":
    main()
