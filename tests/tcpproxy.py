"""A TCP proxy the test controls: a database made unreachable without stopping the shared server."""

from __future__ import annotations

import asyncio


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._silenced: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and break every open one, as a database that went away."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers | self._silenced):
            writer.transport.abort()
        self._silenced.clear()
        for task in list(self._pipes):
            task.cancel()

    async def silence(self) -> None:
        """Let every open connection go silent, as a network path that drops its packets: what
        is sent on it is taken and never forwarded, nothing comes back, nothing is closed. New
        connections are forwarded as before (the path healed for them)."""
        writers, self._writers = self._writers, set()
        self._silenced |= writers  # held open, never written to again
        for task in list(self._pipes):
            task.cancel()
        await asyncio.sleep(0)

    async def restore(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except asyncio.CancelledError:
            if sink in self._silenced:
                return  # silenced: left open
        except (OSError, ConnectionError):
            pass
        sink.transport.abort()
        self._writers.discard(sink)
