"""One generic metadata table cache (L2 tables, refcount blocks).

A ``TableCache`` maps a key (an L2 table's host offset, a refcount block's
index) to a decoded table, with explicit dirty tracking:

- ``get``/``put`` keep the tables in least-recently-used order;
- ``mark_dirty`` says a table was changed in memory and must be written by the
  next flush; ``write_dirty(write)`` hands the dirty tables to ``write`` in key
  order and marks them clean again (that is the only way a dirty table leaves
  the dirty set other than ``drop``/``clear``);
- the cache is bounded: once it holds more than ``capacity`` tables the least
  recently used *clean* ones are dropped.  Eviction NEVER writes anything and
  never drops a dirty table: a cache full of dirty tables grows past its bound
  until the owner flushes at a safe point (``needs_flush`` tells it when), as
  QEMU's qcow2-cache and crosvm's qcow caches do.  The order in which the caches
  reach the disk (data and refcount blocks, then the refcount table, L2 tables,
  L1, header) is the writer's flush (pyqcow/writer.py), not the cache's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

#: Clean L2 tables an image keeps in memory (least recently used dropped first).
L2_CACHE_TABLES = 64
#: The number of dirty L2 tables past which the writer flushes at its next safe
#: point (pyqcow.ops.copier's flush guard too).
MAX_DIRTY_L2 = 256


class TableCache:
    """Bounded LRU of decoded tables; dirty tables are pinned until written."""

    __slots__ = ("capacity", "dirty", "dirty_limit", "tables")

    def __init__(self, capacity: int, dirty_limit: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("a table cache holds at least one table")
        self.capacity = capacity
        #: more dirty tables than this: the owner should flush at its next safe point
        self.dirty_limit = capacity if dirty_limit is None else dirty_limit
        #: key -> table, least recently used first.  The read path may look up
        #: this dict directly (one dict lookup per L2 table, the hot path).
        self.tables: OrderedDict = OrderedDict()
        #: keys changed in memory since they were last written
        self.dirty: set = set()

    # -- lookups -----------------------------------------------------------------
    def get(self, key):
        """The cached table for ``key`` (now the most recently used), or None."""
        t = self.tables.get(key)
        if t is not None:
            self.tables.move_to_end(key)
        return t

    def __contains__(self, key) -> bool:
        return key in self.tables

    def __len__(self) -> int:
        return len(self.tables)

    def __getitem__(self, key):
        return self.tables[key]

    def __setitem__(self, key, table) -> None:
        self.put(key, table)

    def keys(self):
        return self.tables.keys()

    # -- changes -----------------------------------------------------------------
    def put(self, key, table, dirty: bool = False) -> None:
        """Insert (or replace) ``key``'s table as the most recently used; then drop
        clean tables beyond the bound (never ``key`` itself: its caller uses it)."""
        self.tables[key] = table
        self.tables.move_to_end(key)
        if dirty:
            self.dirty.add(key)
        if len(self.tables) > self.capacity:
            self._evict(keep=key)

    def mark_dirty(self, key) -> None:
        """``key``'s cached table changed: write it at the next flush."""
        if key not in self.tables:
            raise KeyError(f"table {key!r} marked dirty but not cached")
        self.dirty.add(key)

    def drop(self, key) -> None:
        """Forget ``key`` (its table was freed), dirty or not."""
        self.dirty.discard(key)
        self.tables.pop(key, None)

    def pop(self, key, default=None):
        """Forget ``key`` and return its table (``default`` if it was not cached)."""
        self.dirty.discard(key)
        return self.tables.pop(key, default)

    def clear(self) -> None:
        """Forget every table, dirty ones included (after a reload or an abandon)."""
        self.tables.clear()
        self.dirty.clear()

    def _evict(self, keep) -> None:
        """Drop least recently used clean tables down to the bound.  Writes nothing."""
        excess = len(self.tables) - self.capacity
        if excess <= 0:
            return
        victims = []
        for key in self.tables:
            if key != keep and key not in self.dirty:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            del self.tables[key]

    # -- flush support -------------------------------------------------------------
    @property
    def needs_flush(self) -> bool:
        return len(self.dirty) > self.dirty_limit

    def dirty_items(self) -> Iterator[tuple]:
        """The dirty (key, table) pairs in key order (host order for L2 tables)."""
        for key in sorted(self.dirty):
            yield key, self.tables[key]

    def write_dirty(self, write: Callable[[object, object], None]) -> bool:
        """``write(key, table)`` for every dirty table in key order, then mark them
        clean (each one only after its write returned).  True if anything was
        written.  The caller fsyncs: the cache knows nothing of the order."""
        if not self.dirty:
            return False
        for key, table in list(self.dirty_items()):
            write(key, table)
            self.dirty.discard(key)
        if len(self.tables) > self.capacity:
            self._evict(keep=None)
        return True


class OnFirstUse:
    """An attribute of an object (a QcowImage's writer and L1 table), made by
    ``make(obj)`` on first use and then kept as an instance attribute (a
    ``__getattr__`` on the class would slow every attribute lookup of an image,
    the read path's too)."""

    def __init__(self, make) -> None:
        self.make = make

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, img, owner=None):
        if img is None:
            return self
        # (setdefault: threads that get here together all use the one kept)
        return img.__dict__.setdefault(self.name, self.make(img))
