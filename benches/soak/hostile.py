#!/usr/bin/env python3
"""Hostile traffic for benches/soak.sh: every kind of abuse the bounds in README "Limits on
anonymous traffic" are for, at once, against one open bot, until --duration passes.

Standard library only. Prints one summary line per kind at the end (what the server answered).
"""
import argparse
import asyncio
import json
import random
import time
from collections import Counter

ANSWERS = Counter()


async def request(host, port, method, path, body=None, headers=None, read=True):
    """One HTTP/1.1 request on a fresh connection; returns (status, body bytes) or (None, b"")."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except Exception:
        return None, b""
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if data is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        w.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (data or b""))
        await w.drain()
        if not read:
            return None, b""
        raw = await asyncio.wait_for(r.read(), 30)
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        return status, rest
    except Exception:
        return None, b""
    finally:
        w.close()


async def conversation(host, port, bot):
    s, b = await request(host, port, "GET", f"/api/v1/bots/{bot}/directline/token")
    if s != 200:
        return None, None
    token = json.loads(b)["token"]
    s, b = await request(host, port, "POST", "/v3/directline/conversations", headers={"Authorization": f"Bearer {token}"})
    if s not in (200, 201):
        return None, None
    return token, json.loads(b)["conversationId"]


async def slowloris(host, port, stop):
    """A socket that sends a header byte every 2 s, reconnecting whenever it is cut."""
    while time.monotonic() < stop:
        try:
            r, w = await asyncio.open_connection(host, port)
            w.write(b"GET /v3/directline/conversations HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < stop:
                w.write(b"X")
                await w.drain()
                try:
                    if await asyncio.wait_for(r.read(1), 2) == b"":
                        ANSWERS["slowloris cut"] += 1
                        break
                except asyncio.TimeoutError:
                    pass
            w.close()
        except Exception:
            ANSWERS["slowloris refused"] += 1
            await asyncio.sleep(1)


async def silent(host, port, stop):
    """A socket that says nothing."""
    while time.monotonic() < stop:
        try:
            r, w = await asyncio.open_connection(host, port)
            data = await asyncio.wait_for(r.read(), max(1, stop - time.monotonic()))
            ANSWERS["silent " + ("refused 503" if data.startswith(b"HTTP/1.1 503") else "cut")] += 1
            w.close()
        except asyncio.TimeoutError:
            pass
        except Exception:
            await asyncio.sleep(1)


async def event_flood(host, port, bot, stop, size):
    """Large events as fast as they are taken, spread over fresh conversations."""
    pad = "e" * size
    while time.monotonic() < stop:
        token, conv = await conversation(host, port, bot)
        if not token:
            ANSWERS["flood start refused"] += 1
            await asyncio.sleep(0.2)
            continue
        for _ in range(8):
            s, _ = await request(host, port, "POST", f"/v3/directline/conversations/{conv}/activities",
                                 {"type": "event", "name": "flood", "value": pad, "from": {"id": "x"}},
                                 {"Authorization": f"Bearer {token}"})
            ANSWERS[f"event {s}"] += 1
            if s != 200:
                await asyncio.sleep(0.2)
                break


async def typing_flood(host, port, bot, stop):
    token, conv = await conversation(host, port, bot)
    while token and time.monotonic() < stop:
        s, _ = await request(host, port, "POST", f"/v3/directline/conversations/{conv}/activities",
                             {"type": "typing", "from": {"id": "x"}}, {"Authorization": f"Bearer {token}"})
        ANSWERS[f"typing {s}"] += 1


async def big_polls(host, port, bot, stop):
    """A conversation filled to its retention, polled from the start over and over."""
    token, conv = await conversation(host, port, bot)
    pad = "p" * 100_000
    for _ in range(20):
        await request(host, port, "POST", f"/v3/directline/conversations/{conv}/activities",
                      {"type": "event", "name": "fill", "value": pad, "from": {"id": "x"}},
                      {"Authorization": f"Bearer {token}"})
    while token and time.monotonic() < stop:
        s, b = await request(host, port, "GET", f"/v3/directline/conversations/{conv}/activities?watermark=",
                             headers={"Authorization": f"Bearer {token}"})
        ANSWERS[f"poll {s}"] += 1
        ANSWERS["poll bytes max"] = max(ANSWERS["poll bytes max"], len(b))


async def stalled_sockets(host, port, bot, stop):
    """WebSockets that are opened and never read."""
    while time.monotonic() < stop:
        token, conv = await conversation(host, port, bot)
        if not token:
            await asyncio.sleep(0.5)
            continue
        try:
            r, w = await asyncio.open_connection(host, port)
            key = "dGhlIHNhbXBsZSBub25jZQ=="
            w.write((f"GET /v3/directline/conversations/{conv}/stream?t={token} HTTP/1.1\r\nHost: x\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            await w.drain()
            pad = "s" * 200_000
            for _ in range(10):
                await request(host, port, "POST", f"/v3/directline/conversations/{conv}/activities",
                              {"type": "event", "name": "stall", "value": pad, "from": {"id": "x"}},
                              {"Authorization": f"Bearer {token}"})
            await asyncio.sleep(15)  # never read; the server gives up on writing
            w.close()
            ANSWERS["stalled socket"] += 1
        except Exception:
            await asyncio.sleep(0.5)


async def garbage(host, port, bot, stop):
    token, conv = await conversation(host, port, bot)
    bodies = [b"{", b"[]", b'{"type": 5}', json.dumps({"type": "message", "text": list(range(1000))}).encode(),
              json.dumps({"type": "message", "from": "nobody"}).encode(), b"\xff\xfe"]
    while token and time.monotonic() < stop:
        s, _ = await request(host, port, "POST", f"/v3/directline/conversations/{conv}/activities",
                             random.choice(bodies), {"Authorization": f"Bearer {token}"})
        ANSWERS[f"garbage {s}"] += 1
        s, _ = await request(host, port, "GET", f"/v3/directline/conversations/{random.getrandbits(64):x}.x/activities")
        ANSWERS[f"stranger lookup {s}"] += 1


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bot", default="target")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--slowloris", type=int, default=300)
    p.add_argument("--silent", type=int, default=300)
    a = p.parse_args()
    stop = time.monotonic() + a.duration
    h, port = a.host, a.port
    tasks = [slowloris(h, port, stop) for _ in range(a.slowloris)]
    tasks += [silent(h, port, stop) for _ in range(a.silent)]
    tasks += [event_flood(h, port, a.bot, stop, 200_000) for _ in range(4)]
    tasks += [typing_flood(h, port, a.bot, stop) for _ in range(2)]
    tasks += [big_polls(h, port, a.bot, stop) for _ in range(8)]
    tasks += [stalled_sockets(h, port, a.bot, stop) for _ in range(4)]
    tasks += [garbage(h, port, a.bot, stop) for _ in range(2)]
    await asyncio.gather(*tasks)
    for k in sorted(ANSWERS):
        print(f"hostile {k}: {ANSWERS[k]}")


if __name__ == "__main__":
    asyncio.run(main())
