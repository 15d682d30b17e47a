"""Unit tests for pyqcow.libvirt: domain XML kept true to a disk image chain."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest
from lxml import etree

from pyqcow import libvirt
from pyqcow.errors import DomainXMLError, QcowError
from pyqcow.libvirt import (
    ChainElement,
    disk_chain,
    disk_source,
    read_domain,
    rewrite_disk,
    snapshot_xml,
    unified_diff,
    update_disk,
    write_atomic,
)

XML_DIR = Path(__file__).resolve().parent.parent / "data" / "xml"
IMG = "/var/lib/libvirt/images/"


def Q(name: str) -> ChainElement:
    return ChainElement(IMG + name, "qcow2")


def R(name: str) -> ChainElement:
    return ChainElement(IMG + name, "raw")


# case -> (target, chain written into the -out.xml file)
GOLDEN = {
    # simple disk, no chain -> a new overlay on top of it
    "overlay": ("vda", [Q("web01.overlay.qcow2"), Q("web01.qcow2")]),
    # 3-deep chain -> 1 after merging everything into the base
    "merge": ("vda", [Q("db01.qcow2")]),
    # live XML (index attributes) with an existing chain replaced by another
    "replace": (
        "sda",
        [Q("build07.overlay.qcow2"), Q("build07.merged.qcow2"), R("debian-12.raw")],
    ),
    # two disks (+ a cdrom), comments, namespaced <metadata>; only vdb changes
    "twodisks": ("vdb", [Q("mail02-spool.20240301.qcow2"), Q("mail02-spool.qcow2")]),
    # disk without <driver>: one is created
    "nodriver": ("hda", [Q("legacy.overlay.qcow2"), R("legacy.img")]),
    # raw base at the end of a 3-element chain (was a plain raw disk)
    "rawbase": (
        "vda",
        [Q("ci-runner.job42.qcow2"), Q("ci-runner.tools.qcow2"), R("ubuntu-22.04-base.raw")],
    ),
    # hand-written: XML declaration, double quotes, 4-space indentation
    "doublequote": (
        "vda",
        [
            ChainElement("/srv/vm/handmade.snap1.qcow2", "qcow2"),
            ChainElement("/srv/vm/handmade.qcow2", "qcow2"),
        ],
    ),
}

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

_DISK_RE = re.compile(rb"(<disk\b.*?</disk>)", re.DOTALL)


def split_disks(data: bytes) -> list[bytes]:
    """[outside, disk, outside, disk, ..., outside] (golden files only)."""
    return _DISK_RE.split(data)


def assert_only_disk_changed(old: bytes, new: bytes, target: str) -> None:
    a, b = split_disks(old), split_disks(new)
    assert len(a) == len(b)
    dev = re.compile(rb"<target dev=['\"]" + re.escape(target.encode()) + rb"['\"]")
    changed = 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i % 2 == 1 and dev.search(x):
            changed += 1
            continue
        assert x == y, f"part {i} changed"
    assert changed == 1


def load(name: str) -> bytes:
    return (XML_DIR / name).read_bytes()


SIMPLE = b"""<domain type='kvm'>
  <name>t</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def domain_with_disk(disk: bytes, extra: bytes = b"") -> bytes:
    return (
        b"<domain type='kvm'>\n  <name>t</name>\n  <devices>\n"
        + disk
        + extra
        + b"  </devices>\n</domain>\n"
    )


# --------------------------------------------------------------------------
# golden files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_rewrite(case: str) -> None:
    target, chain = GOLDEN[case]
    old, expected = load(f"{case}-in.xml"), load(f"{case}-out.xml")
    new = rewrite_disk(old, target, chain)
    assert new == expected
    assert_only_disk_changed(old, new, target)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_idempotent_and_round_trip(case: str) -> None:
    target, chain = GOLDEN[case]
    once = rewrite_disk(load(f"{case}-in.xml"), target, chain)
    assert rewrite_disk(once, target, chain) == once
    assert disk_chain(once, target) == chain
    assert disk_source(once, target) == chain[0]


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_update_disk(case: str, tmp_path: Path) -> None:
    target, chain = GOLDEN[case]
    path = tmp_path / "dom.xml"
    path.write_bytes(load(f"{case}-in.xml"))
    new = update_disk(path, target, chain)
    assert new == load(f"{case}-out.xml")
    assert path.read_bytes() == new
    assert sorted(os.listdir(tmp_path)) == ["dom.xml"]


def test_golden_inputs_chains() -> None:
    assert disk_chain(load("merge-in.xml"), "vda") == [
        Q("db01.snap2.qcow2"),
        Q("db01.snap1.qcow2"),
        Q("db01.qcow2"),
    ]
    assert disk_chain(load("replace-in.xml"), "sda") == [
        Q("build07.overlay.qcow2"),
        Q("build07.old.qcow2"),
        R("debian-12.raw"),
    ]
    assert disk_chain(load("overlay-in.xml"), "vda") == [Q("web01.qcow2")]
    # no <driver>: libvirt's qemu driver treats the image as raw
    assert disk_chain(load("nodriver-in.xml"), "hda") == [R("legacy.img")]
    # <backingStore/> terminator right under the disk
    assert disk_chain(load("twodisks-in.xml"), "vda") == [Q("mail02-system.qcow2")]


def test_golden_table_covers_every_file() -> None:
    files = {p.name for p in XML_DIR.glob("*.xml")}
    expected = {f"{c}-{s}.xml" for c in GOLDEN for s in ("in", "out")}
    assert files == expected


# --------------------------------------------------------------------------
# rewriting details
# --------------------------------------------------------------------------


def test_rewrite_twice_with_different_chains_equals_once() -> None:
    a = rewrite_disk(SIMPLE, "vda", [Q("x.qcow2"), Q("y.qcow2"), Q("z.qcow2")])
    b = rewrite_disk(a, "vda", [Q("top.qcow2"), R("base.raw")])
    assert b == rewrite_disk(SIMPLE, "vda", [Q("top.qcow2"), R("base.raw")])


def test_chain_of_one_writes_terminator() -> None:
    new = rewrite_disk(SIMPLE, "vda", [Q("a.qcow2")])
    assert b"      <backingStore/>\n      <target" in new
    assert disk_chain(new, "vda") == [Q("a.qcow2")]


def test_other_attributes_and_source_children_kept() -> None:
    old = load("twodisks-in.xml")
    new = rewrite_disk(old, "vdb", [Q("s2.qcow2"), Q("s1.qcow2")])
    assert b"<driver name='qemu' type='qcow2' discard='unmap'/>" in new
    assert (
        b"<source file='/var/lib/libvirt/images/s2.qcow2'>\n"
        b"        <seclabel model='dac' relabel='no'/>\n      </source>" in new
    )
    root = etree.fromstring(new)
    ns = {"libosinfo": "http://libosinfo.org/xmlns/libvirt/domain/1.0"}
    assert root.xpath("metadata/libosinfo:libosinfo/libosinfo:os/@id", namespaces=ns)


def test_driver_type_updated_in_place() -> None:
    new = rewrite_disk(load("rawbase-in.xml"), "vda", [Q("top.qcow2"), R("ubuntu-22.04-base.raw")])
    assert b"<driver name='qemu' type='qcow2' cache='writeback'/>" in new


def test_driver_without_type_gets_one() -> None:
    xml = domain_with_disk(
        b"    <disk type='file' device='disk'>\n"
        b"      <driver name='qemu' cache='none'/>\n"
        b"      <source file='/a.img'/>\n"
        b"      <target dev='vda'/>\n"
        b"    </disk>\n"
    )
    new = rewrite_disk(xml, "vda", [ChainElement("/a.img", "raw")])
    assert b"<driver name='qemu' cache='none' type='raw'/>" in new


def test_disk_without_source_gets_one() -> None:
    # the empty cdrom of twodisks-in.xml
    old = load("twodisks-in.xml")
    new = rewrite_disk(old, "sda", [R("install.iso")])
    assert (
        b"      <driver name='qemu' type='raw'/>\n"
        b"      <source file='/var/lib/libvirt/images/install.iso'/>\n"
        b"      <backingStore/>\n"
        b"      <target dev='sda' bus='sata'/>\n" in new
    )
    assert disk_chain(new, "sda") == [R("install.iso")]
    assert_only_disk_changed(old, new, "sda")


def test_disk_without_driver_or_source() -> None:
    xml = domain_with_disk(
        b"    <disk type='file' device='cdrom'>\n      <target dev='hdc' bus='ide'/>\n"
        b"      <readonly/>\n    </disk>\n"
    )
    new = rewrite_disk(xml, "hdc", [ChainElement("/isos/a.iso", "raw")])
    assert (
        b"    <disk type='file' device='cdrom'>\n"
        b"      <driver name='qemu' type='raw'/>\n"
        b"      <source file='/isos/a.iso'/>\n"
        b"      <backingStore/>\n"
        b"      <target dev='hdc' bus='ide'/>\n"
        b"      <readonly/>\n"
        b"    </disk>\n" in new
    )


def test_disk_type_defaults_to_file() -> None:
    xml = domain_with_disk(
        b"    <disk device='disk'>\n      <source file='/a.img'/>\n      <target dev='vda'/>\n    </disk>\n"
    )
    assert disk_chain(xml, "vda") == [ChainElement("/a.img", "raw")]
    new = rewrite_disk(
        xml, "vda", [ChainElement("/b.qcow2", "qcow2"), ChainElement("/a.img", "raw")]
    )
    assert disk_chain(new, "vda")[0] == ChainElement("/b.qcow2", "qcow2")


def test_comments_inside_disk_survive_and_extra_backing_stores_go() -> None:
    xml = domain_with_disk(
        b"    <disk type='file' device='disk'>\n"
        b"      <!-- the driver -->\n"
        b"      <driver name='qemu' type='qcow2'/>\n"
        b"      <source file='/a.qcow2'/>\n"
        b"      <backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>\n"
        b"      <!-- odd: a second chain -->\n"
        b"      <backingStore/>\n"
        b"      <target dev='vda'/>\n"
        b"    </disk>\n"
    )
    with pytest.raises(DomainXMLError, match="disk 'vda' has 2 <backingStore> elements"):
        disk_chain(xml, "vda")
    new = rewrite_disk(xml, "vda", [ChainElement("/c.qcow2", "qcow2")])
    assert new.count(b"<backingStore") == 1
    assert b"<!-- the driver -->" in new
    assert b"<!-- odd: a second chain -->" in new
    assert disk_chain(new, "vda") == [ChainElement("/c.qcow2", "qcow2")]
    assert rewrite_disk(new, "vda", [ChainElement("/c.qcow2", "qcow2")]) == new


def test_crlf_and_tabs() -> None:
    xml = SIMPLE.replace(b"  ", b"\t").replace(b"\n", b"\r\n")
    new = rewrite_disk(xml, "vda", [Q("t.qcow2"), Q("a.qcow2")])
    assert (
        b"\t\t\t<source file='/var/lib/libvirt/images/t.qcow2'/>\r\n"
        b"\t\t\t<backingStore type='file'>\r\n"
        b"\t\t\t\t<format type='qcow2'/>\r\n"
        b"\t\t\t\t<source file='/var/lib/libvirt/images/a.qcow2'/>\r\n"
        b"\t\t\t\t<backingStore/>\r\n"
        b"\t\t\t</backingStore>\r\n"
        b"\t\t\t<target dev='vda' bus='virtio'/>\r\n" in new
    )
    assert b"\n" not in new.replace(b"\r\n", b"")


def test_one_line_disk() -> None:
    xml = (
        b'<domain type="kvm"><name>t</name><devices><disk type="file">'
        b'<source file="/a.qcow2"/><target dev="vda"/></disk></devices></domain>'
    )
    new = rewrite_disk(
        xml, "vda", [ChainElement("/b.qcow2", "qcow2"), ChainElement("/a.qcow2", "qcow2")]
    )
    assert new == (
        b'<domain type="kvm"><name>t</name><devices><disk type="file">'
        b'<driver name="qemu" type="qcow2"/><source file="/b.qcow2"/>'
        b'<backingStore type="file"><format type="qcow2"/><source file="/a.qcow2"/>'
        b"<backingStore/></backingStore>"
        b'<target dev="vda"/></disk></devices></domain>'
    )


def test_bom_declaration_doctype_and_trailing_comment_kept() -> None:
    xml = (
        b"\xef\xbb\xbf<?xml version='1.0' encoding='utf-8'?>\n<!DOCTYPE domain>\n"
        + SIMPLE
        + b"<!-- after -->\n"
    )
    new = rewrite_disk(xml, "vda", [Q("b.qcow2"), Q("a.qcow2")])
    head = b"\xef\xbb\xbf<?xml version='1.0' encoding='utf-8'?>\n<!DOCTYPE domain>\n"
    assert new.startswith(head)
    assert new.endswith(b"</domain>\n<!-- after -->\n")


def test_special_characters_escaped_and_round_trip() -> None:
    weird = [
        ChainElement('/images/it\'s & <fun> "x".qcow2', "qcow2"),
        ChainElement("/images/caf\u00e9 \u2603/b a s e.raw", "raw"),
    ]
    new = rewrite_disk(SIMPLE, "vda", weird)
    assert b"file='/images/it&apos;s &amp; &lt;fun&gt; \"x\".qcow2'" in new
    assert "caf\u00e9 \u2603".encode() in new
    assert disk_chain(new, "vda") == weird
    assert rewrite_disk(new, "vda", weird) == new


def test_unchanged_value_keeps_its_escaping() -> None:
    xml = SIMPLE.replace(b"images/a.qcow2", b"images/a&#46;qcow2")
    new = rewrite_disk(xml, "vda", [Q("a.qcow2")])
    assert b"images/a&#46;qcow2" in new


def test_latin1_document() -> None:
    xml = (
        b"<?xml version='1.0' encoding='ISO-8859-1'?>\n"
        b"<domain type='kvm'>\n  <name>t</name>\n  <description>caf\xe9</description>\n"
        b"  <devices>\n    <disk type='file' device='disk'>\n"
        b"      <source file='/a.img'/>\n      <target dev='vda'/>\n    </disk>\n"
        b"  </devices>\n</domain>\n"
    )
    chain = [ChainElement("/caf\u00e9/\u2603.qcow2", "qcow2"), ChainElement("/a.img", "raw")]
    new = rewrite_disk(xml, "vda", chain)
    assert b"<description>caf\xe9</description>" in new
    assert b"file='/caf\xe9/&#9731;.qcow2'" in new
    assert disk_chain(new, "vda") == chain


def test_utf16_refused() -> None:
    xml = (
        "<?xml version='1.0' encoding='UTF-16'?>\n".encode("utf-16")
        + SIMPLE.decode().encode("utf-16")[2:]
    )
    with pytest.raises(DomainXMLError, match="encoding .* is not supported"):
        rewrite_disk(xml, "vda", [Q("a.qcow2")])


def test_path_like_and_bytes_paths_accepted() -> None:
    new = rewrite_disk(SIMPLE, "vda", [ChainElement(Path("/x/top.qcow2"), "qcow2")])  # type: ignore[arg-type]
    assert disk_chain(new, "vda") == [ChainElement("/x/top.qcow2", "qcow2")]


def test_xml_path_names_the_file_in_errors() -> None:
    with pytest.raises(DomainXMLError, match=r"^/etc/libvirt/qemu/t\.xml: no disk with target"):
        disk_chain(SIMPLE, "vdz", xml_path="/etc/libvirt/qemu/t.xml")
    with pytest.raises(DomainXMLError, match=r"^<domain XML>: no disk with target"):
        disk_chain(SIMPLE, "vdz")


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_error_is_a_qcow_error() -> None:
    with pytest.raises(QcowError):
        disk_chain(b"<domain", "vda")


@pytest.mark.parametrize(
    "xml, match",
    [
        (b"<domain", "not well-formed XML"),
        (b"", "not well-formed XML"),
        (b"<domain><devices></domain>", "not well-formed XML"),
        (b"<network><name>x</name></network>", r"root element is <network>, not <domain>"),
        (
            b"<domain xmlns='urn:x'><devices/></domain>",
            r"root element is <\{urn:x\}domain>, not <domain>",
        ),
    ],
)
def test_bad_documents(xml: bytes, match: str) -> None:
    with pytest.raises(DomainXMLError, match=match):
        disk_chain(xml, "vda", xml_path="/tmp/d.xml")
    with pytest.raises(DomainXMLError, match=match):
        rewrite_disk(xml, "vda", [Q("a.qcow2")], xml_path="/tmp/d.xml")


def test_not_well_formed_is_chained() -> None:
    with pytest.raises(DomainXMLError) as info:
        disk_chain(b"<domain>", "vda")
    assert isinstance(info.value.__cause__, etree.XMLSyntaxError)


def test_str_input_refused() -> None:
    with pytest.raises(DomainXMLError, match="expected the XML document as bytes, got str"):
        disk_chain(SIMPLE.decode(), "vda")  # type: ignore[arg-type]


def test_no_such_target_lists_targets() -> None:
    with pytest.raises(
        DomainXMLError, match=r"no disk with target dev='vdz' \(disk targets: vda, vdb, sda\)"
    ):
        rewrite_disk(load("twodisks-in.xml"), "vdz", [Q("a.qcow2")])


def test_no_disks_at_all() -> None:
    with pytest.raises(DomainXMLError, match=r"\(disk targets: the domain has no disks\)"):
        disk_chain(b"<domain type='kvm'><name>x</name></domain>", "vda")


def test_target_with_quotes_is_just_not_found() -> None:
    with pytest.raises(DomainXMLError, match="no disk with target"):
        disk_chain(SIMPLE, "vda' or '1'='1")


@pytest.mark.parametrize(
    "disk, kind",
    [
        (
            (
                b"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                b"<source dev='/dev/vg0/lv'/><target dev='vda'/></disk>"
            ),
            "block",
        ),
        (
            (
                b"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                b"<source protocol='rbd' name='pool/img'><host name='mon1'/></source>"
                b"<target dev='vda'/></disk>"
            ),
            "network",
        ),
        (
            (
                b"<disk type='volume' device='disk'><source pool='p' volume='v'/>"
                b"<target dev='vda'/></disk>"
            ),
            "volume",
        ),
    ],
)
def test_non_file_disk_refused(disk: bytes, kind: str) -> None:
    xml = domain_with_disk(disk)
    match = rf"disk 'vda' is type='{kind}', not type='file'"
    with pytest.raises(DomainXMLError, match=match):
        rewrite_disk(xml, "vda", [Q("a.qcow2")])
    with pytest.raises(DomainXMLError, match=match):
        disk_chain(xml, "vda")


def test_duplicate_targets_refused() -> None:
    disk = b"<disk type='file'><source file='/a'/><target dev='vda'/></disk>\n"
    xml = domain_with_disk(disk + disk)
    with pytest.raises(DomainXMLError, match="2 disks have target dev='vda'"):
        rewrite_disk(xml, "vda", [Q("a.qcow2")])


def test_duplicate_source_refused() -> None:
    xml = domain_with_disk(
        b"<disk type='file'><source file='/a'/><source file='/b'/><target dev='vda'/></disk>"
    )
    with pytest.raises(DomainXMLError, match="disk 'vda' has 2 <source> elements"):
        rewrite_disk(xml, "vda", [Q("a.qcow2")])


@pytest.mark.parametrize(
    "chain, match",
    [
        ([], "the chain is empty"),
        ([ChainElement("images/a.qcow2", "qcow2")], r"path 'images/a.qcow2' is not absolute"),
        ([ChainElement("./a.qcow2", "qcow2")], "is not absolute"),
        ([ChainElement("/", "qcow2")], "is not absolute"),
        ([ChainElement("", "qcow2")], "bad path"),
        ([Q("a.qcow2"), ChainElement("b.qcow2", "qcow2")], "chain element 1: path 'b.qcow2'"),
        ([ChainElement("/a\nb", "qcow2")], "has control characters"),
        ([ChainElement("/a\x00b", "qcow2")], "has control characters"),
        ([ChainElement(os.fsdecode(b"/a\xffb"), "qcow2")], "not valid UTF-8"),
        ([ChainElement("/a.vmdk", "vmdk")], "format 'vmdk' is not one of qcow2, raw"),
        ([R("a.raw"), Q("b.qcow2")], r"a raw image \(.*a.raw\) cannot have a backing file"),
        ([Q("a.qcow2"), Q("b.qcow2"), Q("a.qcow2")], "appears twice in the chain"),
        (["/a.qcow2"], "not a ChainElement"),
        (Q("a.qcow2"), "must be a sequence of ChainElement"),
        ("/a.qcow2", "must be a sequence of ChainElement"),
    ],
)
def test_bad_chains(chain, match: str) -> None:
    with pytest.raises(DomainXMLError, match=match):
        rewrite_disk(SIMPLE, "vda", chain, xml_path="/x/d.xml")


def test_bad_chain_checked_before_parsing() -> None:
    with pytest.raises(DomainXMLError, match="not absolute"):
        rewrite_disk(b"garbage", "vda", [ChainElement("rel", "qcow2")])


@pytest.mark.parametrize(
    "backing, match",
    [
        (
            (
                b"<backingStore type='network'><format type='raw'/>"
                b"<source protocol='nbd' name='x'><host name='h'/></source></backingStore>"
            ),
            r"backing store 1 of disk 'vda' is type='network', not type='file'",
        ),
        (
            b"<backingStore type='file'><source file='/b'/></backingStore>",
            r"backing store 1 of disk 'vda' has no <format type=...>",
        ),
        (
            b"<backingStore type='file'><format type='qcow2'/></backingStore>",
            r"backing store 1 of disk 'vda' has no <source file=...>",
        ),
        (
            (
                b"<backingStore type='file'><format type='qcow2'/><source file='/b'/>"
                b"<backingStore type='file'><format type='qcow2'/><format type='raw'/>"
                b"<source file='/c'/></backingStore></backingStore>"
            ),
            r"backing store 2 of disk 'vda' has 2 <format> elements",
        ),
    ],
)
def test_bad_backing_store_in_xml(backing: bytes, match: str) -> None:
    xml = domain_with_disk(
        b"<disk type='file'><driver name='qemu' type='qcow2'/><source file='/a'/>"
        + backing
        + b"<target dev='vda'/></disk>"
    )
    with pytest.raises(DomainXMLError, match=match):
        disk_chain(xml, "vda")
    # rewriting replaces the broken chain
    new = rewrite_disk(xml, "vda", [ChainElement("/a", "qcow2")])
    assert disk_chain(new, "vda") == [ChainElement("/a", "qcow2")]


def test_disk_without_source_file_in_reads() -> None:
    old = load("twodisks-in.xml")
    with pytest.raises(DomainXMLError, match="disk 'sda' has no <source>"):
        disk_source(old, "sda")
    xml = domain_with_disk(
        b"<disk type='file'><source startupPolicy='optional'/><target dev='vda'/></disk>"
    )
    with pytest.raises(DomainXMLError, match=r"disk 'vda' has no <source file=\.\.\.>"):
        disk_chain(xml, "vda")


# --------------------------------------------------------------------------
# entities, DTDs, XXE
# --------------------------------------------------------------------------


def test_internal_entity_refused() -> None:
    xml = b"<!DOCTYPE domain [<!ENTITY d 'vda'>]>" + SIMPLE.replace(b"dev='vda'", b"dev='&d;'")
    with pytest.raises(DomainXMLError, match="the DOCTYPE declares entities"):
        disk_chain(xml, "vda")


def test_external_entity_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET-42")
    for url in ("file:///etc/passwd", secret.as_uri()):
        xml = (
            b'<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY xxe SYSTEM "'
            + url.encode()
            + b'">]>\n<domain type="kvm"><name>&xxe;</name><devices>'
            b'<disk type="file"><source file="/a"/><target dev="vda"/></disk>'
            b"</devices></domain>"
        )
        for call in (
            lambda xml=xml: disk_chain(xml, "vda"),
            lambda xml=xml: rewrite_disk(xml, "vda", [Q("a.qcow2")]),
            lambda xml=xml: snapshot_xml("s", {"vda": Q("a.qcow2")}, domain_xml=xml),
        ):
            with pytest.raises(DomainXMLError, match="DOCTYPE declares entities") as info:
                call()
            assert "TOPSECRET" not in str(info.value)
            assert "root:" not in str(info.value)


def test_parameter_entity_refused() -> None:
    xml = b'<!DOCTYPE domain [<!ENTITY % pe SYSTEM "http://127.0.0.1:9/x.dtd"> %pe;]>' + SIMPLE
    t0 = time.monotonic()
    with pytest.raises(DomainXMLError, match="DOCTYPE declares entities"):
        disk_chain(xml, "vda")
    assert time.monotonic() - t0 < 1.0


def test_entity_check_does_not_rely_on_prescan(monkeypatch: pytest.MonkeyPatch) -> None:
    # even if the byte pre-scan missed it, lxml's view of the DTD refuses it
    monkeypatch.setattr(libvirt.markup, "_prolog_doctype", lambda data: None)
    xml = b"<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + SIMPLE
    with pytest.raises(DomainXMLError, match="DOCTYPE declares entities"):
        disk_chain(xml, "vda")


def test_billion_laughs_refused_quickly() -> None:
    decls = [b'<!ENTITY lol0 "lol">']
    for i in range(1, 10):
        decls.append(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1)) * 10))
    xml = (
        b'<?xml version="1.0"?>\n<!DOCTYPE domain [\n'
        + b"\n".join(decls)
        + b"\n]>\n"
        + SIMPLE.replace(b"<name>t</name>", b"<name>&lol9;</name>")
    )
    t0 = time.monotonic()
    with pytest.raises(DomainXMLError, match="DOCTYPE declares entities"):
        rewrite_disk(xml, "vda", [Q("a.qcow2")])
    assert time.monotonic() - t0 < 1.0


def test_external_dtd_refused_and_not_fetched() -> None:
    xml = b'<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/domain.dtd">\n' + SIMPLE
    t0 = time.monotonic()
    with pytest.raises(DomainXMLError, match="names an external DTD"):
        disk_chain(xml, "vda")
    assert time.monotonic() - t0 < 1.0


def test_undeclared_entity_is_not_well_formed() -> None:
    with pytest.raises(DomainXMLError, match="not well-formed"):
        disk_chain(SIMPLE.replace(b"<name>t</name>", b"<name>&x;</name>"), "vda")


def test_doctype_with_harmless_internal_subset_kept() -> None:
    head = b"<!DOCTYPE domain [\n  <!-- ] > tricky -->\n  <!ATTLIST domain id CDATA '#x]>'>\n]>\n"
    new = rewrite_disk(head + SIMPLE, "vda", [Q("b.qcow2"), Q("a.qcow2")])
    assert new.startswith(head)
    assert disk_chain(new, "vda") == [Q("b.qcow2"), Q("a.qcow2")]


def test_parser_settings() -> None:
    assert isinstance(libvirt.PARSER, etree.XMLParser)
    for name in ("XPATH_DISK_BY_TARGET", "XPATH_DISK_TARGETS", "XPATH_BACKING_STORE"):
        assert isinstance(getattr(libvirt, name), etree.XPath)
    assert libvirt.XPATH_DISK_BY_TARGET.path == "devices/disk[target/@dev=$t]"


# --------------------------------------------------------------------------
# tricky bytes the splicer must not trip over
# --------------------------------------------------------------------------


def test_markup_lookalikes_elsewhere_untouched() -> None:
    xml = (
        b"<domain type='kvm'>\n"
        b"  <name>t</name>\n"
        b"  <description><![CDATA[<disk><target dev='vda'/></disk> ]]></description>\n"
        b"  <!-- <disk type='file'><target dev='vda'/></disk> -->\n"
        b"  <?pi <disk> ?>\n"
        b"  <metadata><x:a xmlns:x='urn:x' v='a>b' w=\"it's\"/></metadata>\n"
        b"  <devices>\n"
        b"    <disk type='file' device='disk'>\n"
        b"      <source file='/a.qcow2'/>\n"
        b"      <target dev='vda'/>\n"
        b"    </disk>\n"
        b"  </devices>\n"
        b"</domain>\n"
    )
    new = rewrite_disk(
        xml, "vda", [ChainElement("/b.qcow2", "qcow2"), ChainElement("/a.qcow2", "qcow2")]
    )
    i = xml.index(b"    <disk type='file' device='disk'>")
    j = xml.index(b"</disk>\n  </devices>") + len(b"</disk>")
    assert new.startswith(xml[:i])
    assert new.endswith(xml[j:])
    assert disk_chain(new, "vda")[1] == ChainElement("/a.qcow2", "qcow2")


def test_attribute_with_gt_and_odd_spacing_in_disk() -> None:
    xml = domain_with_disk(
        b"    <disk   type = \"file\"\n          device='disk' >\n"
        b"      <driver name = 'qemu'  type=\"raw\" />\n"
        b"      <source\n        file = '/a.img' x='1>2'/>\n"
        b"      <target dev='vda'/>\n"
        b"    </disk>\n"
    )
    new = rewrite_disk(
        xml, "vda", [ChainElement("/b.qcow2", "qcow2"), ChainElement("/a.img", "raw")]
    )
    assert b"<driver name = 'qemu'  type=\"qcow2\" />" in new
    assert b"<source\n        file = '/b.qcow2' x='1>2'/>" in new
    # new elements use the quote style of the <disk> start tag
    assert b'<backingStore type="file">' in new


def test_lexer_agrees_with_lxml_on_golden_files() -> None:
    for path in sorted(XML_DIR.glob("*.xml")):
        data = path.read_bytes()
        spans, _ = libvirt._scan(data)
        names = [
            etree.QName(e).localname.encode() for e in etree.fromstring(data).iter(etree.Element)
        ]
        assert [s.name.rpartition(b":")[2] for s in spans] == names, path.name


# --------------------------------------------------------------------------
# reading and writing files
# --------------------------------------------------------------------------


def test_read_domain(tmp_path: Path) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(SIMPLE)
    assert read_domain(p) == SIMPLE
    assert read_domain(str(p)) == SIMPLE


def test_read_domain_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.xml"
    with pytest.raises(
        DomainXMLError, match=rf"^{re.escape(str(missing))}: cannot read domain XML"
    ) as info:
        read_domain(missing)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(DomainXMLError, match="cannot read domain XML"):
        read_domain(tmp_path)
    big = tmp_path / "big.xml"
    big.write_bytes(b" " * 101)
    monkeypatch.setattr(libvirt.document, "MAX_DOMAIN_XML_SIZE", 100)
    with pytest.raises(DomainXMLError, match="larger than 100 bytes"):
        read_domain(big)


def test_update_disk_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(SIMPLE)
    with pytest.raises(
        DomainXMLError, match=rf"^{re.escape(str(p))}: no disk with target dev='vdq'"
    ):
        update_disk(p, "vdq", [Q("a.qcow2")])
    assert p.read_bytes() == SIMPLE


def test_update_disk_unchanged_does_not_write(tmp_path: Path) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(load("merge-out.xml"))
    ino = p.stat().st_ino
    assert update_disk(p, "vda", [Q("db01.qcow2")]) == load("merge-out.xml")
    assert p.stat().st_ino == ino


def test_write_atomic_replaces_and_keeps_mode(tmp_path: Path) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(b"old")
    p.chmod(0o640)
    ino = p.stat().st_ino
    write_atomic(p, b"new")
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert p.stat().st_ino != ino  # renamed over, not rewritten in place
    assert os.listdir(tmp_path) == ["d.xml"]


def test_write_atomic_keeps_owner(tmp_path: Path) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(b"old")
    if os.geteuid() == 0:
        os.chown(p, 4321, 4322)
        p.chmod(0o600)
    before = p.stat()
    write_atomic(p, b"new")
    after = p.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)


def test_write_atomic_new_file_honours_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "n.xml", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "n.xml").stat().st_mode) == 0o640


def test_write_atomic_follows_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.xml"
    real.write_bytes(b"old")
    link = tmp_path / "link.xml"
    link.symlink_to(real)
    write_atomic(link, b"new")
    assert link.is_symlink()
    assert real.read_bytes() == b"new"


def test_write_atomic_rename_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(SIMPLE)
    p.chmod(0o600)
    before = p.stat()

    def fail(src, dst):
        raise OSError(28, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(p, b"new")
    assert os.listdir(tmp_path) == ["d.xml"]
    assert p.read_bytes() == SIMPLE
    assert p.stat().st_ino == before.st_ino
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_write_atomic_write_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "d.xml"
    p.write_bytes(SIMPLE)

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error"):
        update_disk(p, "vda", [Q("b.qcow2"), Q("a.qcow2")])
    assert os.listdir(tmp_path) == ["d.xml"]
    assert p.read_bytes() == SIMPLE


def test_write_atomic_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "d.xml", b"x")


# --------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------


def test_unified_diff() -> None:
    old = load("overlay-in.xml")
    new = load("overlay-out.xml")
    diff = unified_diff(old, new, "web01.xml")
    assert diff.startswith("--- web01.xml\n+++ web01.xml\n@@ ")
    assert "-      <source file='/var/lib/libvirt/images/web01.qcow2'/>\n" in diff
    assert "+      <backingStore type='file'>\n" in diff
    assert unified_diff(old, old, "x") == ""


def test_unified_diff_no_trailing_newline() -> None:
    diff = unified_diff(b"a\nb", b"a\nc", "f")
    assert "-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n" in diff


# --------------------------------------------------------------------------
# <domainsnapshot>
# --------------------------------------------------------------------------


def test_snapshot_xml_basic() -> None:
    out = snapshot_xml(
        "snap1",
        {"vda": Q("web01.snap1.qcow2")},
        skipped=["vdb"],
        creation_time=1700000000,
    )
    assert out == (
        b"<domainsnapshot>\n"
        b"  <name>snap1</name>\n"
        b"  <state>disk-snapshot</state>\n"
        b"  <creationTime>1700000000</creationTime>\n"
        b"  <memory snapshot='no'/>\n"
        b"  <disks>\n"
        b"    <disk name='vda' snapshot='external' type='file'>\n"
        b"      <driver type='qcow2'/>\n"
        b"      <source file='/var/lib/libvirt/images/web01.snap1.qcow2'/>\n"
        b"    </disk>\n"
        b"    <disk name='vdb' snapshot='no'/>\n"
        b"  </disks>\n"
        b"</domainsnapshot>\n"
    )


def test_snapshot_xml_all_fields_escaped() -> None:
    out = snapshot_xml(
        "nightly <1>",
        {"vda": ChainElement("/img/a'b&c.qcow2", "qcow2")},
        description="before upgrade & reboot\nsecond line",
        parent="weekly",
        state="shutoff",
        creation_time=5,
    )
    root = etree.fromstring(out)
    assert root.findtext("name") == "nightly <1>"
    assert root.findtext("description") == "before upgrade & reboot\nsecond line"
    assert root.findtext("state") == "shutoff"
    assert root.findtext("parent/name") == "weekly"
    assert root.findtext("creationTime") == "5"
    assert root.find("disks/disk/source").get("file") == "/img/a'b&c.qcow2"


def test_snapshot_xml_default_creation_time() -> None:
    t0 = int(time.time())
    out = snapshot_xml("s", {"vda": Q("a.qcow2")})
    value = int(etree.fromstring(out).findtext("creationTime"))
    assert t0 <= value <= int(time.time())


def test_snapshot_xml_embeds_domain_verbatim() -> None:
    domain = load("twodisks-in.xml")
    out = snapshot_xml(
        "s1", {"vdb": Q("mail02-spool.s1.qcow2")}, creation_time=1, domain_xml=domain
    )
    root = etree.fromstring(out)
    # vda and sda were not mentioned: added as snapshot='no'
    assert [(d.get("name"), d.get("snapshot")) for d in root.find("disks")] == [
        ("vdb", "external"),
        ("vda", "no"),
        ("sda", "no"),
    ]
    dom = root.find("domain")
    assert dom.get("type") == "kvm"
    assert dom.findtext("uuid") == "c1b2a3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
    # the embedded domain is the original text, indented by two more spaces
    original = domain.decode()
    embedded = "\n".join(
        "  " + line if line else line for line in original.rstrip("\n").split("\n")
    )
    assert embedded in out.decode()


def test_snapshot_xml_domain_accepts_source_path_as_name() -> None:
    out = snapshot_xml(
        "s1",
        {IMG + "mail02-spool.qcow2": Q("spool.s1.qcow2")},
        skipped=["vda"],
        creation_time=1,
        domain_xml=load("twodisks-in.xml"),
    )
    names = [d.get("name") for d in etree.fromstring(out).find("disks")]
    assert names == [IMG + "mail02-spool.qcow2", "vda", "sda"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": ""}, "bad snapshot name"),
        ({"name": "a/b"}, "contains '/'"),
        ({"name": "a\x01"}, "control characters"),
        ({"disks": {}}, "at least one disk"),
        ({"disks": {"vda": R("a.raw")}}, "overlay must be qcow2, not 'raw'"),
        ({"disks": {"vda": ChainElement("a.qcow2", "qcow2")}}, "is not absolute"),
        ({"disks": {"vda": "/a.qcow2"}}, "not a ChainElement"),
        ({"skipped": ["vda"]}, "disk vda named more than once"),
        ({"state": "frozen"}, "state 'frozen' is not one of"),
        ({"creation_time": -1}, "bad creation time"),
        ({"creation_time": "now"}, "bad creation time"),
        ({"description": "a\x00b"}, "bad description"),
        ({"parent": ""}, "bad parent snapshot name"),
        ({"domain_xml": b"<domain"}, "not well-formed"),
        ({"domain_xml": b"<network/>"}, "root element is <network>"),
        ({"domain_xml": b"<domain><name>x</name></domain>"}, "<domain> has no type attribute"),
        ({"domain_xml": SIMPLE, "skipped": ["vdc"]}, r"no disk named vdc \(disk targets: vda\)"),
    ],
)
def test_snapshot_xml_errors(kwargs: dict, match: str) -> None:
    args = {"name": "s", "disks": {"vda": Q("a.qcow2")}, "creation_time": 1}
    args.update(kwargs)
    name = args.pop("name")
    disks = args.pop("disks")
    with pytest.raises(DomainXMLError, match=match):
        snapshot_xml(name, disks, **args)
