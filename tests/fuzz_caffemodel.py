"""A structure-aware fuzzer of ``replica import`` on caffemodels (tests/test_hostile.py runs it, bounded).

Three valid 1/16-width seeds (the V2 schema, V1, V1 with legacy 4-D fc blobs) are parsed into a
field tree (NetParameter → layer → blob → shape / LRN). Three cases in four mutate the tree (wire
type, field number, delete, duplicate, interesting integers up to 2⁷⁰, packed dims, truncated or
NaN payloads, shuffle, a field moved into another message, a new random field) and serialize it
again with consistent lengths; the others mutate bytes (bit flips, 10-16 byte varints, truncation,
inserted 2⁴⁰-length keys, splices). Case ``i`` draws from ``random.Random(i)``: reproducible.

``python tests/fuzz_caffemodel.py START COUNT`` runs cases START … START+COUNT-1 in this process
(under whatever limits it was started with) and prints one JSON line a case that was not a clean
result (exit 0, or exit 2 with one line), then a summary line.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_weights import caffe_blobs, caffemodel, varint  # noqa: E402  (the suite's own writer)

DESCEND = {(): {100, 2}, ("L",): {7, 6, 118, 18}, ("L", "B"): {7}}
INTERESTING = [0, 1, 2, 3, 5, 96, 127, 128, 255, 1 << 16, (1 << 31) - 1, 1 << 31, 1 << 32, 1 << 40,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 70]


def seeds() -> list[bytes]:
    b = caffe_blobs()
    return [caffemodel(b), caffemodel(b, schema="V1"), caffemodel(b, schema="V1", legacy_fc=True)]


def rd_varint(b, i):
    v = s = 0
    while True:
        if i >= len(b) or s > 63:
            raise ValueError
        x = b[i]
        v |= (x & 0x7F) << s
        i += 1
        s += 7
        if x < 0x80:
            return v, i


def parse(b, path=()):
    out, i = [], 0
    while i < len(b):
        key, i = rd_varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = rd_varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 2:
            n, i = rd_varint(b, i)
            v, i = b[i:i + n], i + n
            if f in DESCEND.get(path, ()):
                sub = path + (("L",) if not path else ("B",) if f in (7, 6) else ("R",))
                try:
                    v = parse(v, sub)
                except ValueError:
                    pass
        else:
            raise ValueError
        if i > len(b):
            raise ValueError
        out.append([f, wt, v])
    return out


def ser(nodes):
    out = bytearray()
    for f, wt, v in nodes:
        out += varint(f << 3 | wt)
        if wt == 0:
            out += varint(v if isinstance(v, int) else 0)
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            raw = v if isinstance(v, (bytes, bytearray)) else bytes(n)
            out += bytes(raw[:n]).ljust(n, b"\0")
        elif wt == 2:
            body = ser(v) if isinstance(v, list) else bytes(v) if isinstance(v, (bytes, bytearray)) else varint(v)
            out += varint(len(body)) + body
    return bytes(out)


def all_nodes(nodes, acc=None):
    acc = [] if acc is None else acc
    for n in nodes:
        acc.append((nodes, n))
        if n[1] == 2 and isinstance(n[2], list):
            all_nodes(n[2], acc)
    return acc


def tree_mutate(rng, tree):
    items = all_nodes(tree)
    lst, node = rng.choice(items)
    op = rng.randrange(11)
    f, wt, v = node
    if op == 0:  # wire type change
        node[1] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
        if node[1] == 0:
            node[2] = rng.choice(INTERESTING)
        elif node[1] == 2 and not isinstance(v, (list, bytes, bytearray)):
            node[2] = b""
    elif op == 1:  # field number
        node[0] = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 18, 100, 118, rng.randrange(1, 1 << 29)])
    elif op == 2:
        lst.remove(node)
    elif op == 3:
        lst.insert(rng.randrange(len(lst) + 1),
                   [node[0], node[1], node[2] if not isinstance(node[2], list) else [list(x) for x in node[2]]])
    elif op == 4 and wt == 0:
        node[2] = rng.choice(INTERESTING)
    elif op == 5 and wt == 2 and not isinstance(v, list):  # packed varints of interesting values (dims)
        node[2] = b"".join(varint(rng.choice(INTERESTING)) for _ in range(rng.randrange(0, 5)))
    elif op == 6 and wt == 2 and not isinstance(v, list):
        k = rng.randrange(4)
        node[2] = [b"", bytes(v[: len(v) // 2]), bytes(v[: max(0, len(v) - rng.randrange(1, 5))]),
                   np.array([np.nan, np.inf, -np.inf, 1e38] * 4, "<f4").tobytes()][k]
    elif op == 7 and isinstance(v, list) and len(v) > 1:
        rng.shuffle(v)
    elif op == 8:  # move into another message
        lst.remove(node)
        targets = [n for _, n in items if n[1] == 2 and isinstance(n[2], list) and n is not node]
        (rng.choice(targets)[2] if targets else lst).append(node)
    elif op == 9 and wt == 2 and isinstance(v, list):  # a message back to raw bytes
        node[2] = ser(v)
    else:  # a new random field
        lst.insert(rng.randrange(len(lst) + 1), [rng.choice([1, 2, 3, 4, 5, 7, 8]), rng.choice([0, 1, 2, 5]),
                                                rng.choice([rng.choice(INTERESTING),
                                                            rng.randbytes(rng.randrange(0, 12))])])
    return tree


def byte_mutate(rng, b):
    b = bytearray(b)
    op = rng.randrange(6)
    i = rng.randrange(len(b)) if b else 0
    if op == 0 and b:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = b"\xff" * rng.randrange(9, 16) + b"\x01"
    elif op == 2:
        b = b[:i]
    elif op == 3:
        b[i:i] = varint(rng.choice([2, 7, 100]) << 3 | 2) + varint(rng.choice(INTERESTING))
    elif op == 4 and b:
        b[i] = rng.randrange(256)
    else:
        j = rng.randrange(len(b) + 1)
        b[i:i] = b[j:j + rng.randrange(1, 64)]
    return bytes(b)


def make_case(i: int, seed_files: list[bytes]) -> bytes:
    rng = random.Random(i)
    seed = seed_files[i % len(seed_files)]
    if rng.random() < 0.75:
        tree = parse(seed)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            tree = tree_mutate(rng, tree)
        data = ser(tree)
        if rng.random() < 0.15:
            data = byte_mutate(rng, data)
    else:
        data = seed
        for _ in range(rng.choice([1, 1, 2, 4])):
            data = byte_mutate(rng, data)
    return data


class CaseTimeout(Exception):
    pass


def run(start: int, count: int, folder: Path, seconds: int = 20) -> dict:
    """Each case through ``replica import`` (the command's own main, in this process); a case
    over ``seconds`` is stopped and counted as a hang."""
    import logging

    from replica.cli import main

    logging.disable(logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    seed_files = seeds()
    counts = dict(clean=0, accepted=0, crashed=0, hung=0, left_folder=0)
    slowest = 0.0

    def alarm(*_):
        raise CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    for i in range(start, start + count):
        path, out = folder / "case.caffemodel", folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        path.write_bytes(make_case(i, seed_files))
        err = io.StringIO()
        t0 = time.perf_counter()
        signal.alarm(seconds)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["import", str(path), "--out", str(out), "--mean", "104,117,123"])
            r = dict(rc=rc)
        except CaseTimeout:
            r = dict(rc="hang")
        except BaseException as e:  # noqa: BLE001 (a crash: what the fuzzer is for)
            r = dict(rc="exc", exc=type(e).__name__, msg=str(e)[:200])
        finally:
            signal.alarm(0)
        slowest = max(slowest, time.perf_counter() - t0)
        lines = err.getvalue().strip().splitlines()
        if r["rc"] == 0:
            counts["accepted"] += 1
        elif r["rc"] == 2 and lines and lines[-1].startswith("replica: error:") and "Traceback" not in err.getvalue():
            counts["clean"] += 1
            if out.exists():
                counts["left_folder"] += 1
                print(json.dumps(dict(case=i, left=sorted(p.name for p in out.iterdir()))))
        else:
            counts["hung" if r["rc"] == "hang" else "crashed"] += 1
            print(json.dumps(dict(case=i, **r, err=lines[-3:])))
    counts["slowest_s"] = round(slowest, 3)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    import tempfile

    run(int(sys.argv[1]), int(sys.argv[2]), Path(tempfile.mkdtemp(prefix="fuzz-")))
