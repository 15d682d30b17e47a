"""Operations under test and what each one promises after a crash.

A scenario is built from a ``pyqcow.testing`` chain (files in ``pristine``).
``OPERATIONS[name](chain) -> Scenario`` gives ``op(work_dir)`` (run the
operation on a copy) and ``expect(work_dir) -> crashkit.Expect`` (which name
the user reads and which guest contents are acceptable there).  The same table
drives the in-process fault injection and the SIGKILL child (see child.py).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from crashkit import Expect, Inconsistent, pyqcow_read

import pyqcow
from pyqcow.testing import GeneratedChain, Op


@dataclass
class Scenario:
    name: str
    op: Callable[[str], object]
    expect: Callable[[str], Expect]
    min_depth: int = 2


def rel(ch: GeneratedChain, i: int) -> str:
    return os.path.relpath(ch.layers[i], ch.directory)


def _top_reads(ch: GeneratedChain, states=None, **kw):
    states = states or [ch.expected[0]]
    return lambda w: Expect([(os.path.join(w, rel(ch, 0)), states)], **kw)


def commit(ch):
    from pyqcow.ops.commit import commit as run

    return Scenario("commit", lambda w: run(os.path.join(w, rel(ch, 0))), _top_reads(ch))


def commit_base(ch):
    from pyqcow.ops.commit import commit as run

    def op(w):
        return run(os.path.join(w, rel(ch, 0)), os.path.join(w, rel(ch, 2)))

    return Scenario("commit-b", op, _top_reads(ch), min_depth=3)


def stream(ch):
    from pyqcow.ops.stream import stream as run

    return Scenario("stream", lambda w: run(os.path.join(w, rel(ch, 0))), _top_reads(ch))


def stream_base(ch):
    from pyqcow.ops.stream import stream as run

    def op(w):
        return run(os.path.join(w, rel(ch, 0)), os.path.join(w, rel(ch, 2)))

    return Scenario("stream-b", op, _top_reads(ch), min_depth=3)


def rebase_safe(ch):
    """Safe rebase of the top onto the bottom of the chain (skipping one layer),
    or onto nothing for a two-image chain."""
    from pyqcow.ops.rebase import rebase as run

    def op(w):
        top = os.path.join(w, rel(ch, 0))
        if len(ch.layers) >= 3:
            new = os.path.relpath(os.path.join(w, rel(ch, 2)), os.path.dirname(top))
            return run(top, new, backing_format=ch.formats[2])
        return run(top, None)

    return Scenario("rebase", op, _top_reads(ch))


def rebase_unsafe(ch):
    """Unsafe rebase onto the bottom image: the view switches in one header write."""
    from pyqcow.ops.rebase import rebase as run

    top_rel = rel(ch, 0)
    new_rel = os.path.relpath(ch.layers[-1], os.path.dirname(ch.layers[0]))

    def op(w):
        return run(os.path.join(w, top_rel), new_rel, backing_format=ch.formats[-1], unsafe=True)

    after = _after(ch, op, top_rel)
    return Scenario("rebase-u", op, _top_reads(ch, [ch.expected[0], after]))


def _after(ch, op, read_rel) -> bytes:
    tmp = ch.directory + ".after"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ch.directory, tmp)
    try:
        op(tmp)
        return pyqcow_read(os.path.join(tmp, read_rel))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(keep: str, via: str):
    def make(ch):
        from pyqcow.ops.merge import merge as run

        top_rel, base_rel = rel(ch, 0), rel(ch, 1)
        kept_rel = base_rel if keep == "base" else top_rel

        def op(w):
            return run(os.path.join(w, top_rel), keep=keep, via=via)

        def expect(w):
            # docs: while TOP's name exists it reads TOP's content; once gone, the kept name
            return Expect([(os.path.join(w, top_rel), [ch.expected[0]]),
                           (os.path.join(w, kept_rel), [ch.expected[0]])])

        return Scenario(f"merge-{keep}-{via}", op, expect)

    return make


def convert(ch):
    from pyqcow.chain import open_image
    from pyqcow.ops.convert import convert_to_raw

    top_rel = rel(ch, 0)

    def op(w):
        with open_image(os.path.join(w, top_rel)) as src:
            convert_to_raw(src, os.path.join(w, "converted.raw"))
        with open(os.path.join(w, "converted.raw"), "rb") as f:
            if f.read() != ch.expected[0]:
                raise Inconsistent("convert produced wrong data")  # never in a clean run

    return Scenario("convert", op, _top_reads(ch))


def guest_writes(seed: int):
    """A burst of random guest writes/zeroes/discards with flushes in between."""

    def make(ch):
        top_rel = rel(ch, 0)
        size = len(ch.expected[0])
        p = ch.params[0]
        cs = p.cluster_size if p else 512
        r = random.Random(seed)
        ops = []
        kinds = ["write", "write", "zero"]
        if p is not None and not (p.version == 2 and len(ch.layers) > 1):
            kinds.append("discard")
        for _ in range(r.randint(3, 8)):
            kind = r.choice(kinds)
            if kind == "discard":
                full = size // cs
                if not full:
                    continue
                first = r.randrange(full)
                ops.append(Op("discard", first * cs, min(r.randint(1, 3), full - first) * cs))
                continue
            off = r.randrange(size)
            ops.append(Op(kind, off, r.randint(1, min(size - off, 3 * cs)), r.getrandbits(32),
                          r.random() < 0.5))
        flush_after = {i for i in range(len(ops)) if r.random() < 0.3}
        states = [ch.expected[0]]
        model = bytearray(ch.expected[0])
        for o in ops:
            o.apply_to_model(model)
            states.append(bytes(model))

        def op(w):
            with pyqcow.open(os.path.join(w, top_rel), "r+") as img:
                for i, o in enumerate(ops):
                    if o.kind == "write":
                        img.write(o.offset, o.data)
                    elif o.kind == "zero":
                        img.write_zeroes(o.offset, o.length)
                    else:
                        img.discard(o.offset, o.length)
                    if i in flush_after:
                        img.flush()

        return Scenario("writes", op, _top_reads(ch, states, bytewise=True), min_depth=1)

    return make


def snapshot_create(ch):
    from pyqcow.ops import snapshot as snap

    top_rel = rel(ch, 0)

    def op(w):
        snap.create_snapshot(os.path.join(w, top_rel), "crashsnap")

    def expect(w):
        def extra(path):
            names = {s.name for s in snap.list_snapshots(path)}
            if "crashsnap" in names:
                with pyqcow.open(path) as img:
                    got = img.snapshot("crashsnap").read(0, img.virtual_size)
                if got != ch.expected[0]:
                    raise Inconsistent("new snapshot does not read as the active layer did")

        return Expect([(os.path.join(w, top_rel), [ch.expected[0]])], extra=extra)

    return Scenario("snapshot-create", op, expect, min_depth=1)


def snapshot_delete(ch):
    """Delete one of two snapshots taken in the pristine copy; the other must survive."""
    from pyqcow.ops import snapshot as snap

    top_rel = rel(ch, 0)

    def prepare(directory):
        path = os.path.join(directory, top_rel)
        snap.create_snapshot(path, "keep")
        with pyqcow.open(path, "r+") as img:
            img.write(0, b"\xaa" * min(4096, img.virtual_size))
        snap.create_snapshot(path, "gone")

    def op(w):
        snap.delete_snapshot(os.path.join(w, top_rel), "gone")

    active = bytearray(ch.expected[0])
    active[: min(4096, len(active))] = b"\xaa" * min(4096, len(active))

    def expect(w):
        def extra(path):
            with pyqcow.open(path) as img:
                if img.snapshot("keep").read(0, img.virtual_size) != ch.expected[0]:
                    raise Inconsistent("surviving snapshot changed")
                names = {s.name for s in img.snapshots}
                if "gone" in names and img.snapshot("gone").read(0, img.virtual_size) != active:
                    raise Inconsistent("snapshot being deleted reads wrong data")

        return Expect([(os.path.join(w, top_rel), [bytes(active)])], extra=extra)

    sc = Scenario("snapshot-delete", op, expect, min_depth=1)
    sc.prepare = prepare
    return sc


OPERATIONS: dict[str, Callable] = {
    "commit": commit,
    "commit-b": commit_base,
    "stream": stream,
    "stream-b": stream_base,
    "rebase": rebase_safe,
    "rebase-u": rebase_unsafe,
    **{f"merge-{k}-{v}": merge(k, v) for k in ("base", "top") for v in ("commit", "stream", "auto")},
    "convert": convert,
    "writes": guest_writes(1),
    "snapshot-create": snapshot_create,
    "snapshot-delete": snapshot_delete,
}
MIN_DEPTH = {"commit-b": 3, "stream-b": 3, "writes": 1, "snapshot-create": 1,
             "snapshot-delete": 1}


def build(name: str, ch: GeneratedChain, seed: int = 0, *, prepare: bool = True) -> Scenario:
    """The scenario ``name`` on chain ``ch``; ``prepare`` sets up ``ch.directory`` first
    (only once per pristine directory)."""
    if name == "writes":
        sc = guest_writes(seed)(ch)
    else:
        sc = OPERATIONS[name](ch)
    prep = getattr(sc, "prepare", None)
    if prep is not None and prepare:
        prep(ch.directory)
    return sc
