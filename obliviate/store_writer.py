"""The store's writer process, ``python -m obliviate.store_writer STORE``, and ``RowWriter``, which
feeds it rows on stdin while training goes on.

A separate process, not a thread: compressing and writing a row costs about a millisecond of
Python in zarr, and in a thread that time is taken from training through the GIL. It imports
only numpy, zarr and obliviate.store, so it starts in well under a second.

Protocol, little-endian: per row a header ``(k, theta_bytes, opt_bytes)`` as three int64, then
the float32 bytes of P_k and of its optimizer state; ``k = -1`` ends the stream.
"""

from __future__ import annotations

import queue
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from obliviate.errors import StoreError
from obliviate.store import ParamStore

HEADER = struct.Struct("<qqq")
END = -1
MAX_SLAB_BYTES = 256 << 20
FLUSH_SECONDS = 0.5


def encode(k: int, theta: np.ndarray, opt: np.ndarray | None) -> bytes:
    t = np.ascontiguousarray(theta, dtype="<f4").tobytes()
    o = b"" if opt is None else np.ascontiguousarray(opt, dtype="<f4").tobytes()
    return HEADER.pack(k, len(t), len(o)) + t + o


def encode_end() -> bytes:
    return HEADER.pack(END, 0, 0)


def _read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("the training process went away before ending the stream")
        buf += chunk
    return bytes(buf)


def serve(store_path: Path | str, stream, flush_seconds: float = FLUSH_SECONDS) -> None:
    """Write rows from ``stream`` (an unbuffered binary pipe) until the end marker.

    Rows are buffered and written as one slab when ``flush_seconds`` have passed since the last
    write, when the buffer is large, or at the end: zarr costs about a millisecond of CPU per
    chunk written, so batching keeps the writer light. A row still in the buffer at a crash is
    simply retrained on resume (training is deterministic), since ``completed`` lags behind it.
    """
    import numcodecs.blosc
    import zarr

    # One core for the writer; the others stay with training.
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
    store = ParamStore.open(store_path)
    rows: list = []
    size, last_flush = 0, time.monotonic()

    def flush() -> None:
        nonlocal rows, size, last_flush
        ks = [r[0] for r in rows]
        if ks != sorted(set(ks)):
            raise ValueError(f"rows arrived out of order: {ks}")
        while rows:  # one slab per run of consecutive rows (a thinned store keeps every s-th)
            n = next((i for i in range(1, len(rows)) if rows[i][0] != rows[0][0] + i), len(rows))
            run, rows = rows[:n], rows[n:]
            opts = None if run[0][2] is None else np.stack([r[2] for r in run])
            store.write_rows(run[0][0], np.stack([r[1] for r in run]), opts)
        rows, size, last_flush = [], 0, time.monotonic()

    while True:
        wait = max(0.0, flush_seconds - (time.monotonic() - last_flush)) if rows else None
        if select.select([stream], [], [], wait)[0]:
            k, nt, no = HEADER.unpack(_read_exact(stream, HEADER.size))
            if k == END:
                flush()
                return
            theta = np.frombuffer(_read_exact(stream, nt), dtype="<f4")
            opt = np.frombuffer(_read_exact(stream, no), dtype="<f4") if no else None
            rows.append((k, theta, opt))
            size += nt + no
        if rows and (time.monotonic() - last_flush >= flush_seconds or size > MAX_SLAB_BYTES):
            flush()


class RowWriter:
    """Streams rows to a writer process so training never waits on compression or disk.

    ``put`` hands a row to a feeder thread, which pipes it to ``obliviate.store_writer``
    (blocking in the kernel, not holding the GIL). The queue is bounded, so a slow disk applies
    back-pressure instead of growing memory. A writer failure is raised in the training thread
    at the next ``put`` or on exit. Reopen the store afterwards: the writer changed it.
    """

    def __init__(self, store: ParamStore, depth: int = 4):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(
            target=self._feed, name="obliviate-store-feeder", daemon=True
        )

    def __enter__(self) -> RowWriter:
        cmd = [sys.executable, "-m", "obliviate.store_writer", str(self.store.path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.thread.start()
        return self

    def put(self, k: int, theta, opt) -> None:
        self._raise_if_failed()
        self.queue.put(encode(k, np.asarray(theta), None if opt is None else np.asarray(opt)))

    def _feed(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.proc.stdin.write(item)
                except OSError as exc:  # the writer died; its stderr says why
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None or (self.proc and self.proc.poll() not in (None, 0)):
            self.proc.wait()
            detail = self.proc.stderr.read().decode().strip() or str(self.error)
            raise StoreError(f"writing {self.store.path} failed: {detail}")

    def __exit__(self, exc_type, *exc) -> None:
        self.queue.put(None)  # on an exception too: rows already queued still land
        self.thread.join()
        if self.error is None:
            try:
                self.proc.stdin.write(encode_end())
            except OSError as err:
                self.error = err
        self.proc.stdin.close()
        self.proc.wait()
        if exc_type is None:
            self._raise_if_failed()


def main() -> int:
    try:
        serve(sys.argv[1], sys.stdin.buffer.raw)  # a folder or a URL: ParamStore tells
    except Exception as exc:
        print(f"store writer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
