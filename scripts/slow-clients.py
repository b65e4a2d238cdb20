#!/usr/bin/env python3
"""Slow and greedy clients against a running Tally (e.g. `make dev`): N connections that
each send half a request head and wait, then, one second in, one normal request.
Prints how long the normal request took and how many half-sent ones the server closed
by 35 s.  Usage: scripts/slow-clients.py [PORT] [N]   (default 8080 3000)."""
import asyncio, time, json, sys, urllib.request
HOST = "127.0.0.1"
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
N = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
async def half(results):
    try:
        r, w = await asyncio.open_connection(HOST, PORT)
    except Exception as e:
        results.append(("refused", 0)); return
    w.write(b"POST /accounts HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
    await w.drain()
    t = time.monotonic()
    try:
        data = await asyncio.wait_for(r.read(1024), timeout=40)
        results.append(("closed", time.monotonic() - t))
    except asyncio.TimeoutError:
        results.append(("open", 40))
    w.close()
def normal():
    t = time.monotonic()
    req = urllib.request.Request(f"http://{HOST}:{PORT}/accounts", data=b'{"ID": "served-%d"}' % int(t*1000), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, time.monotonic() - t
async def main():
    results = []
    tasks = [asyncio.create_task(half(results)) for _ in range(N)]
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    status, took = await loop.run_in_executor(None, normal)
    print(f"normal request among {N} half-sent: {status} in {took:.2f} s")
    await asyncio.sleep(34)
    still = N - len(results)
    print(f"after 35 s: {len(results)} closed by the server, {still} still open")
    await asyncio.gather(*tasks)
    closed = sorted(t for k, t in results if k == "closed")
    print(f"closed: {len(closed)}, open at 40 s: {sum(1 for k,_ in results if k=='open')}, refused: {sum(1 for k,_ in results if k=='refused')}; closed after p50 {closed[len(closed)//2]:.1f} s, max {closed[-1]:.1f} s")
asyncio.run(main())
