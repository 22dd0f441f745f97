"""Throughput and round-trip time of the transport Stream API, over the Unix stand-in.

    .venv/bin/python -m bench.transport_bench [--mib 256] [--round-trips 2000]

Prints one JSON object. Each measurement runs the two ends in two processes
(as the guest and dom0 agents are), each with its own selector loop, so the
figures include the Stream layer, the selector and the kernel, not just send().
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import selectors
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

from qvaudio.transport import Stream, UnixAddress, connect, listen

CHUNK = 64 * 1024


def _wait(sel: selectors.BaseSelector, stream: Stream) -> None:
    sel.select()
    stream.handle_wakeup()


def _sink(address: UnixAddress, total: int, report: Connection) -> None:
    """dom0 side of the throughput run: read until ``total`` bytes arrived."""
    stream = connect(address)
    got = 0
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), stream.poll_events(want_write=False))
        while got < total:
            data = stream.read(CHUNK)
            if data:
                got += len(data)
            else:
                _wait(sel, stream)
    report.send(got)
    stream.close()


def _echo(address: UnixAddress, size: int, count: int) -> None:
    """dom0 side of the round-trip run: send every message straight back."""
    stream = connect(address)
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), stream.poll_events(want_write=False))
        for _ in range(count):
            message = bytearray()
            while len(message) < size:
                data = stream.read(size - len(message))
                if data:
                    message += data
                else:
                    _wait(sel, stream)
            view = memoryview(message)
            while view:
                view = view[stream.write(view) :]
    stream.close()


def _accept(address: UnixAddress, target: Any, *args: Any) -> tuple[Stream, Any]:
    ctx = multiprocessing.get_context("fork")
    listener = listen(address)
    child = ctx.Process(target=target, args=(address, *args))
    child.start()
    with selectors.DefaultSelector() as sel:
        sel.register(listener.fileno(), selectors.EVENT_READ)
        while (stream := listener.accept()) is None:
            sel.select()
    listener.close()
    return stream, child


def throughput(address: UnixAddress, mib: int) -> dict[str, Any]:
    total = mib << 20
    receiver, sender_end = multiprocessing.get_context("fork").Pipe(duplex=False)
    stream, child = _accept(address, _sink, total, sender_end)
    block = os.urandom(CHUNK)
    sent = 0
    full = 0
    start = time.perf_counter()
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), stream.poll_events(want_write=True))
        while sent < total:
            n = stream.write(block[: min(CHUNK, total - sent)])
            sent += n
            if n == 0:
                full += 1
                _wait(sel, stream)
        got = receiver.recv()
    elapsed = time.perf_counter() - start
    child.join()
    stream.close()
    if got != total:
        raise RuntimeError(f"receiver got {got} of {total} bytes")
    return {
        "bytes": total,
        "write_size": CHUNK,
        "seconds": round(elapsed, 4),
        "MB_per_s": round(total / elapsed / 1e6, 1),
        "MiB_per_s": round(total / elapsed / (1 << 20), 1),
        "writes_refused_when_full": full,
    }


def round_trips(address: UnixAddress, size: int, count: int) -> dict[str, Any]:
    stream, child = _accept(address, _echo, size, count)
    message = os.urandom(size)
    samples: list[float] = []
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), stream.poll_events(want_write=False))
        for _ in range(count):
            start = time.perf_counter()
            view = memoryview(message)
            while view:
                view = view[stream.write(view) :]
            reply = bytearray()
            while len(reply) < size:
                data = stream.read(size - len(reply))
                if data:
                    reply += data
                else:
                    _wait(sel, stream)
            samples.append(time.perf_counter() - start)
            if reply != message:
                raise RuntimeError("echo corrupted the message")
    child.join()
    stream.close()
    micros = sorted(s * 1e6 for s in samples)
    return {
        "message_bytes": size,
        "round_trips": count,
        "median_us": round(statistics.median(micros), 1),
        "p99_us": round(micros[int(0.99 * (len(micros) - 1))], 1),
        "min_us": round(micros[0], 1),
        "max_us": round(micros[-1], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB for the throughput run")
    parser.add_argument("--round-trips", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qvaudio-bench-") as tmp:
        address = UnixAddress(os.path.join(tmp, "bench.sock"))
        result = {
            "transport": "unix (stand-in for vchan/vsock), Stream API + selectors, 2 processes",
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
            "throughput": throughput(address, args.mib),
            "rtt_64B": round_trips(address, 64, args.round_trips),
            "rtt_4KiB": round_trips(address, 4096, args.round_trips),
        }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
