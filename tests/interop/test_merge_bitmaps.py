"""merge carries persistent dirty bitmaps (libvirt checkpoints, incremental backup):
the merged image holds BASE's bitmaps and TOP's, a bitmap in both is their union,
and every cluster TOP allocated is dirty in all of them.  qemu reads them back
(qemu-nbd -B, then qemu-img map x-dirty-bitmap) as the oracle."""

from __future__ import annotations

import pytest
import qemu
from nbd_bitmap import qemu_dirty

from pyqcow.cli.main import main
from pyqcow.ops.merge import merge

KiB = 1024
MiB = 1024 * KiB
GRAN = 64 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


def granules(ranges) -> set[int]:
    out = set()
    for off, length in ranges:
        out.update(range(off // GRAN, (off + length + GRAN - 1) // GRAN))
    return out


def top_allocated(top) -> set[int]:
    m = qemu.qemu_img_json("map", "--output=json", top)
    return granules((e["start"], e["length"]) for e in m if e["depth"] == 0
                    and (e["data"] or e["zero"]) and e.get("present", True))


def build(d):
    base = qemu.create(d / "base.qcow2", 4 * MiB)
    qemu.bitmap_add(base, "b0")
    qemu.bitmap_add(base, "both")
    qemu.qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 3M 64k")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.bitmap_add(top, "t0")
    qemu.bitmap_add(top, "both")
    qemu.qemu_io(top, "write -P 0x21 512k 128k", "write -P 0x22 2M 64k", "write -z 3M 64k")
    return base, top


@pytest.mark.parametrize(("keep", "via"), [("base", "commit"), ("base", "stream"),
                                           ("top", "commit"), ("top", "stream")])
def test_merge_carries_and_unions_bitmaps(tmp_path, keep, via):
    base, top = build(tmp_path)
    before = {"b0": granules(qemu_dirty(base, "b0")),
              "both_base": granules(qemu_dirty(base, "both")),
              "both_top": granules(qemu_dirty(top, "both")),
              "t0": granules(qemu_dirty(top, "t0"))}
    alloc = top_allocated(top)
    assert alloc and before["b0"] and before["t0"]
    merge(top, keep=keep, via=via)
    kept = base if keep == "base" else top
    info = qemu.info_json(kept)
    names = {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}
    assert set(names) == {"b0", "t0", "both"}
    assert all("in-use" not in b["flags"] for b in names.values()), names
    b0 = granules(qemu_dirty(kept, "b0"))
    assert b0 == before["b0"] | alloc
    both = granules(qemu_dirty(kept, "both"))
    assert both >= before["both_base"] | before["both_top"] | alloc
    t0 = granules(qemu_dirty(kept, "t0"))
    assert t0 >= before["t0"] | alloc
    res, rc = qemu.check_json(kept)
    assert rc == 0 and not res.get("leaks"), res


def test_bitmaps_that_cannot_be_kept_are_a_refusal(tmp_path, capsys):
    """A v2 base cannot hold TOP's bitmaps: the plan refuses (dry run and run), --force
    merges without them."""
    base = qemu.create(tmp_path / "base.qcow2", 2 * MiB, "compat=0.10")
    qemu.qemu_io(base, "write -P 0x11 0 1M")
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    qemu.bitmap_add(top, "t0")
    qemu.qemu_io(top, "write -P 0x21 0 64k")
    before = {p: p.read_bytes() for p in (base, top)}
    rc = main(["merge", "--dry-run", "--keep", "base", "--via", "commit", str(top)])
    out, err = capsys.readouterr()
    assert rc == 1 and "bitmap" in err and "refused:" in out
    rc = main(["merge", "--keep", "base", "--via", "commit", str(top)])
    out, err = capsys.readouterr()
    assert rc == 1 and "bitmap" in err
    assert {p: p.read_bytes() for p in (base, top)} == before
    rc = main(["merge", "--force", "--keep", "base", "--via", "commit", str(top)])
    assert rc == 0
    res, rc = qemu.check_json(base)
    assert rc == 0
