"""Plan chain operations as data: which guest ranges come from where.

The one planner of the ops; the copier (``copier.py``) executes its plans.

- Between layers (commit, stream, rebase): a ``Piece`` says what the chain from
  some image down to (but excluding) a base shows over a guest range: ``data``
  held by ``layer`` (with the layer's Run), ``zero`` (a zero cluster, or past
  the end of a shorter backing file), or ``below`` (nothing above the base
  allocates it: it reads from the base).
- The whole guest view (convert): a ``RawPlan`` of ``CopyStep``s, built from the
  chain's block status (``mapping.chain_status``, qemu-img map's view), so that
  any source with a block status (raw files with holes, snapshot views) plans
  the same way; ranges that read as zeros are not in it.  ``copy_chunks`` cuts
  it into cluster-aligned chunks for a qcow2 destination.
"""

from __future__ import annotations

from ..entries import ClusterType, l1_l2_offset, l2_host_offset, l2_read_type
from ..mapping import UNALLOCATED_TYPES, ZERO_TYPES, Run, chain_status
from ..record import FrozenRecord, Record
from ..tablescan import nonzero_indices, scanner
from ..walk import prefetch_l2_tables


class Piece(Record):
    """guest_offset, length, kind ("data" | "zero" | "below"), layer and run (the
    layer's Run, for data).  A Record, not a dataclass (start-up time); its own
    __init__: plans make one per run."""

    __slots__ = ("guest_offset", "length", "kind", "layer", "run")

    def __init__(self, guest_offset: int, length: int, kind: str, layer: object | None = None,
                 run: Run | None = None) -> None:
        self.guest_offset = guest_offset
        self.length = length
        self.kind = kind
        self.layer = layer
        self.run = run

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


def _add(out: list[Piece], p: Piece) -> None:
    if p.length <= 0:
        return
    if out and p.kind in ("zero", "below") and out[-1].kind == p.kind and out[-1].end == p.guest_offset:
        out[-1].length += p.length
        return
    out.append(p)


def pieces_above(img, base, start: int, length: int) -> list[Piece]:
    """What the chain ``img`` .. (excluding ``base``) shows over [start, start+length)."""
    out: list[Piece] = []
    _walk(img, base, start, length, out)
    return out


def _walk(img, base, start: int, length: int, out: list[Piece]) -> None:
    if img is base:
        _add(out, Piece(start, length, "below"))
        return
    inside = max(0, min(length, img.virtual_size - start))
    if inside:
        backing = img.backing
        # (the hot loop of a commit plan: one pass per run of the top, the
        # common cases -- data, and a hole over the base -- without calls)
        base_end = base.virtual_size if base is not None and backing is base else -1
        for run in img.runs(start, inside):
            t = run.type
            g = run.guest_offset
            if t in UNALLOCATED_TYPES:
                if g + run.length <= base_end:  # all inside the base: "below"
                    last = out[-1] if out else None
                    if last is not None and last.kind == "below" and last.end == g:
                        last.length += run.length
                    else:
                        out.append(Piece(g, run.length, "below"))
                elif backing is None:
                    _add(out, Piece(g, run.length, "zero"))
                elif backing is base:
                    _below(base, g, run.length, out)
                else:
                    _walk(backing, base, g, run.length, out)
            elif t in ZERO_TYPES:
                _add(out, Piece(g, run.length, "zero", img, run))
            elif run.length > 0:
                out.append(Piece(g, run.length, "data", img, run))
    if inside < length:
        _add(out, Piece(start + inside, length - inside, "zero"))


def _below(base, start: int, length: int, out: list[Piece]) -> None:
    inside = max(0, min(length, base.virtual_size - start))
    if inside:
        _add(out, Piece(start, inside, "below"))
    if inside < length:
        _add(out, Piece(start + inside, length - inside, "zero"))


def unallocated_ranges(img, start: int = 0, length: int | None = None) -> list[tuple[int, int]]:
    if length is None:
        length = img.virtual_size - start
    out: list[tuple[int, int]] = []
    for r in img.runs(start, length):
        if r.type in UNALLOCATED_TYPES:
            if out and out[-1][0] + out[-1][1] == r.guest_offset:
                out[-1] = (out[-1][0], out[-1][1] + r.length)
            else:
                out.append((r.guest_offset, r.length))
    return out


def data_bytes(pieces: list[Piece]) -> int:
    return sum(p.length for p in pieces if p.kind == "data")


def data_bytes_within(pieces: list[Piece], ranges: list[tuple[int, int]]) -> int:
    """Data bytes of ``pieces`` inside ``ranges`` (both sorted by guest offset)."""
    total = 0
    j = 0
    for p in pieces:
        if p.kind != "data":
            continue
        start, end = p.guest_offset, p.end
        while j < len(ranges) and ranges[j][0] + ranges[j][1] <= start:
            j += 1
        k = j
        while k < len(ranges) and ranges[k][0] < end:
            r0, r1 = ranges[k][0], ranges[k][0] + ranges[k][1]
            total += min(end, r1) - max(start, r0)
            k += 1
    return total


def _is_data(t) -> bool:
    """A run type that _walk turns into a "data" piece."""
    return t not in UNALLOCATED_TYPES and t not in ZERO_TYPES


def _data_bytes_in(layer, start: int, end: int) -> int:
    """Bytes of ``layer``'s own data runs inside [start, end) (clipped to its size)."""
    end = min(end, layer.virtual_size)
    if end <= start:
        return 0
    return sum(r.length for r in layer.runs(start, end - start) if _is_data(r.type))


def merge_costs(top, base) -> tuple[int, int]:
    """(commit bytes, stream bytes) of merging qcow2 ``top`` with its backing ``base``:
    what ``data_bytes(plan_commit(top, base))`` and ``stream_bytes(top,
    base.backing)`` say, counted without building the plans.

    One pass over TOP's L1: each L2 table of either layer is read at most once,
    and none where an L1 entry is 0 (a run of TOP's empty L1 entries is one
    lookup in BASE, a run of BASE's is none), so the time follows the allocated
    metadata, not the virtual size.  Commit copies TOP's data; stream copies
    BASE's data where TOP allocates nothing."""
    for layer in (top, base):
        prefetch_l2_tables(layer)
    if _tables_comparable(top, base):
        return _costs_by_tables(top, base)
    size = top.virtual_size
    span = 1 << (top.cluster_bits + top.l2_bits)
    l1 = top.l1
    nspans = -(-size // span)
    used = nonzero_indices(memoryview(l1)[:nspans]) if nspans else []
    commit = stream = 0
    pos = 0  # guest bytes before pos are counted
    for index in used:
        start = index * span
        end = min(size, start + span)
        stream += _data_bytes_in(base, pos, start)  # TOP maps nothing there
        holes: list[tuple[int, int]] = []  # where TOP allocates nothing, in [start, end)
        gap = start
        for r in top.runs(start, end - start):
            if r.type in UNALLOCATED_TYPES:
                continue
            if _is_data(r.type):
                commit += r.length
            if r.guest_offset > gap:
                holes.append((gap, r.guest_offset - gap))
            gap = r.end
        if end > gap:
            holes.append((gap, end - gap))
        stream += _data_bytes_over(base, holes)
        pos = end
    stream += _data_bytes_in(base, pos, size)
    return commit, stream


def _tables_comparable(top, base) -> bool:
    """Whether ``_costs_by_tables`` can compare the two layers' L2 tables entry by
    entry (standard entries, one cluster size); otherwise merge_costs walks runs."""
    return (getattr(base, "format", None) == "qcow2" and not top.extended_l2
            and not base.extended_l2 and top.cluster_bits == base.cluster_bits)


def _costs_by_tables(top, base) -> tuple[int, int]:
    """merge_costs from the L2 tables themselves, one L2 span at a time: in each
    table only the entries that are not all zero (the C scan) become Python ints,
    and no runs are made.  The entries are checked as a lookup checks them."""
    cs = top.cluster_size
    span_shift = top.cluster_bits + top.l2_bits
    size, shared = top.virtual_size, min(top.virtual_size, base.virtual_size)
    scan = scanner()
    top_l1 = _l1_used(top, size, span_shift, scan)
    base_l1 = _l1_used(base, shared, span_shift, scan)
    top_limit, base_limit = (img.data_hf.size() if img.has_data_file else img.file_size
                             for img in (top, base))
    commit = stream = 0
    for index in sorted(top_l1.keys() | base_l1.keys()):
        start = index << span_shift
        top_alloc: set[int] = set()
        if index in top_l1:
            for i, kind in _span_entries(top, top_limit, top_l1[index], start, size, scan):
                top_alloc.add(i)
                if kind:
                    commit += min(cs, size - start - i * cs)
        if index in base_l1:
            for i, kind in _span_entries(base, base_limit, base_l1[index], start, shared,
                                          scan):
                if kind and i not in top_alloc:
                    stream += min(cs, shared - start - i * cs)
    return commit, stream


def _l1_used(img, end: int, span_shift: int, scan) -> dict[int, int]:
    """L1 index -> L2 table offset, for ``img``'s L1 entries below guest ``end``
    that point to a table."""
    nspans = -(-end >> span_shift) if end > 0 else 0
    l1 = img.l1
    out = {}
    for i in scan(memoryview(l1)[:nspans]) if nspans else ():
        off = l1_l2_offset(l1[i])
        if off:
            out[i] = off
    return out


def _span_entries(img, limit: int, l2_offset: int, start: int, end: int, scan):
    """(index, data?) of the entries of the L2 table at ``l2_offset`` (guest span
    from ``start``) below guest ``end`` that allocate (read from this layer);
    ``limit``: where the layer's host data ends (for the lookup's checks)."""
    cached = img.l2_cache.get(l2_offset)  # (a table the writer holds: as it is now)
    table = cached if cached is not None else img.l2_table_bytes(l2_offset)
    count = min(img.l2_entries, -(-(end - start) >> img.cluster_bits))
    data_file, version = img.has_data_file, img.header.version
    for i in scan(memoryview(table)[: count if cached is not None else 8 * count]):
        e = cached[i] if cached is not None else int.from_bytes(table[8 * i : 8 * i + 8], "big")
        t = l2_read_type(e, data_file, version)
        if t in UNALLOCATED_TYPES:
            continue
        if t == ClusterType.NORMAL or t == ClusterType.ZERO_ALLOC:
            img._check_host(l2_host_offset(e), limit, e)
        yield i, t == ClusterType.NORMAL or t == ClusterType.COMPRESSED


def _data_bytes_over(layer, holes: list[tuple[int, int]]) -> int:
    """Bytes of ``layer``'s own data runs inside ``holes`` (sorted (start, length)
    ranges of one L2 span), from one lookup of the span."""
    if not holes:
        return 0
    start = holes[0][0]
    end = min(holes[-1][0] + holes[-1][1], layer.virtual_size)
    if end <= start:
        return 0
    data = [(r.guest_offset, r.length) for r in layer.runs(start, end - start)
            if _is_data(r.type)]
    return _overlap(data, holes)


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Bytes in both of two sorted lists of disjoint (start, length) ranges."""
    total = i = j = 0
    while i < len(a) and j < len(b):
        a0, a1 = a[i][0], a[i][0] + a[i][1]
        b0, b1 = b[j][0], b[j][0] + b[j][1]
        total += max(0, min(a1, b1) - max(a0, b0))
        if a1 <= b1:
            i += 1
        else:
            j += 1
    return total


# ---------------------------------------------------------------- the whole guest view
class CopyStep(FrozenRecord):
    """guest_offset, length; fd: copy host bytes from this fd, starting at
    host_offset (both None: read through the image)."""

    __slots__ = ("guest_offset", "length", "fd", "host_offset")
    _fields = __slots__
    _defaults = {"fd": None, "host_offset": None}


class RawPlan(Record):
    """virtual_size, steps (CopySteps)."""

    __slots__ = ("virtual_size", "steps")
    _factories = {"steps": list}

    @property
    def data_bytes(self) -> int:
        return sum(s.length for s in self.steps)


def data_fds(img) -> dict[str, int]:
    """File name -> fd of every file holding guest data of ``img``'s chain."""
    fds = {}
    for layer in img.chain:
        hf = getattr(layer, "data_hf", None) or layer.hf
        name = getattr(layer, "data_file_path", None) or layer.path
        fds.setdefault(name, hf.fd)
    return fds


def plan_raw(img) -> RawPlan:
    """Which guest ranges of ``img`` hold data, and where to copy them from."""
    fds = data_fds(img)
    plan = RawPlan(img.virtual_size)
    for e in chain_status(img):
        if not e.data or e.zero:
            continue
        fd = fds.get(e.filename) if e.offset is not None and e.filename else None
        if fd is not None:
            plan.steps.append(CopyStep(e.start, e.length, fd, e.offset))
        else:
            plan.steps.append(CopyStep(e.start, e.length))
    return plan


def _merge_aligned(ranges: list[tuple[int, int]], start: int, length: int, cs: int,
                   size: int) -> None:
    a = start & ~(cs - 1)
    b = min(size, (start + length + cs - 1) & ~(cs - 1))
    if ranges and ranges[-1][1] >= a:
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], b))
    else:
        ranges.append((a, b))


def cluster_ranges(plan: RawPlan, cs: int) -> list[tuple[int, int]]:
    """The (start, end) guest ranges of ``plan``'s steps widened to whole clusters."""
    ranges: list[tuple[int, int]] = []
    for st in plan.steps:
        _merge_aligned(ranges, st.guest_offset, st.length, cs, plan.virtual_size)
    return ranges


Chunk = tuple[int, int, "int | None", "int | None"]  # (guest, length, fd, host)


def copy_chunks(plan: RawPlan, ranges: list[tuple[int, int]], chunk: int) -> list[Chunk]:
    """``ranges`` cut into pieces of at most ``chunk`` bytes; a piece that lies inside
    one step with a host file carries that ``fd`` and host offset (it can be read
    straight from the file), the others (None, None) are read through the image."""
    chunks: list[Chunk] = []
    steps = plan.steps
    si = 0
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(chunk, b - pos)
            while si < len(steps) and steps[si].guest_offset + steps[si].length <= pos:
                si += 1
            fd = host = None
            if si < len(steps):
                st = steps[si]
                if st.fd is not None and st.guest_offset <= pos and pos + n <= st.guest_offset + st.length:
                    fd, host = st.fd, st.host_offset + (pos - st.guest_offset)
            chunks.append((pos, n, fd, host))
            pos += n
    return chunks

