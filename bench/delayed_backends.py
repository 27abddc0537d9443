"""Three tiny JSON backends for bench/traffic.sh: 127.0.0.1:18081, :18082, :18083 answer every
request after 5, 10 and 20 ms (asyncio sleeps, keep-alive), so a composed request's latency can be
compared with its slowest call."""
import asyncio

DELAYS = {18081: 0.005, 18082: 0.010, 18083: 0.020}


async def serve(reader, writer, delay, body):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    servers = []
    for port, delay in DELAYS.items():
        body = b'{"delay_ms": %d}' % int(delay * 1000)
        servers.append(await asyncio.start_server(
            lambda r, w, d=delay, b=body: serve(r, w, d, b), "127.0.0.1", port))
    await asyncio.gather(*(s.serve_forever() for s in servers))


asyncio.run(main())
