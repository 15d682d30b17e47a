"""Property tests for pyqcow.libvirt: any chain written is the chain read back,
the rest of the document is untouched, and the result stays a valid domain."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from pyqcow.libvirt import ChainElement, disk_chain, rewrite_disk, snapshot_xml

XML_DIR = Path(__file__).resolve().parent.parent / "data" / "xml"
SCHEMAS = Path("/usr/share/libvirt/schemas")

# (input file, disk target) pairs to rewrite
DOCUMENTS = [
    ("overlay-in.xml", "vda"),
    ("merge-in.xml", "vda"),
    ("replace-in.xml", "sda"),
    ("twodisks-in.xml", "vdb"),
    ("twodisks-in.xml", "sda"),
    ("nodriver-in.xml", "hda"),
    ("rawbase-in.xml", "vda"),
    ("doublequote-in.xml", "vda"),
]

SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+,@%~ "
# characters XML must escape, and some beyond ASCII
TRICKY = SAFE + "&'\"<>\u00e9\u2603"

component = st.text(alphabet=SAFE, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
tricky_component = st.text(alphabet=TRICKY, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@st.composite
def chains(draw, components=component) -> list[ChainElement]:
    length = draw(st.integers(min_value=1, max_value=5))
    paths = draw(
        st.lists(
            st.lists(components, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
            min_size=length,
            max_size=length,
            unique=True,
        )
    )
    raw_last = draw(st.booleans())
    return [
        ChainElement(p, "raw" if raw_last and i == length - 1 else "qcow2")
        for i, p in enumerate(paths)
    ]


@cache
def source(name: str) -> bytes:
    return (XML_DIR / name).read_bytes()


@cache
def relaxng(name: str) -> etree.RelaxNG | None:
    path = SCHEMAS / name
    if not path.exists():
        return None
    return etree.RelaxNG(etree.parse(str(path)))


def disk_span(data: bytes, target: str) -> tuple[int, int]:
    for m in re.finditer(rb"<disk\b.*?</disk>", data, re.DOTALL):
        if re.search(rb"<target dev=['\"]" + re.escape(target.encode()) + rb"['\"]", m.group()):
            return m.span()
    raise AssertionError(f"no disk {target}")


def check_rewrite(name: str, target: str, chain: list[ChainElement]) -> bytes:
    old = source(name)
    new = rewrite_disk(old, target, chain)
    assert disk_chain(new, target) == chain
    assert rewrite_disk(new, target, chain) == new
    a0, a1 = disk_span(old, target)
    b0, b1 = disk_span(new, target)
    assert a0 == b0 and old[:a0] == new[:b0]
    assert old[a1:] == new[b1:]
    return new


@given(doc=st.sampled_from(DOCUMENTS), chain=chains())
def test_rewrite_round_trip(doc: tuple[str, str], chain: list[ChainElement]) -> None:
    new = check_rewrite(*doc, chain)
    schema = relaxng("domain.rng")
    if schema is not None:
        assert schema.validate(etree.fromstring(new)), schema.error_log
    assert new.count(b"<backingStore/>") >= 1


@given(doc=st.sampled_from(DOCUMENTS), chain=chains(tricky_component))
def test_rewrite_round_trip_escaping(doc: tuple[str, str], chain: list[ChainElement]) -> None:
    check_rewrite(*doc, chain)


@given(doc=st.sampled_from(DOCUMENTS), first=chains(), second=chains())
def test_rewrite_is_last_writer_wins(
    doc: tuple[str, str], first: list[ChainElement], second: list[ChainElement]
) -> None:
    name, target = doc
    once = rewrite_disk(source(name), target, second)
    twice = rewrite_disk(rewrite_disk(source(name), target, first), target, second)
    assert twice == once


@given(
    overlay=chains().map(lambda c: ChainElement(c[0].path, "qcow2")),
    name=st.text(alphabet=SAFE.replace(" ", ""), min_size=1, max_size=20),
    creation_time=st.integers(min_value=0, max_value=2**40),
)
def test_snapshot_xml_structure(overlay: ChainElement, name: str, creation_time: int) -> None:
    out = snapshot_xml(
        name,
        {"vdb": overlay},
        creation_time=creation_time,
        domain_xml=source("twodisks-in.xml"),
    )
    root = etree.fromstring(out)
    assert root.findtext("name") == name
    assert root.find("disks/disk/source").get("file") == overlay.path
    schema = relaxng("domainsnapshot.rng")
    if schema is not None:
        assert schema.validate(root), schema.error_log


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed")
        pytest.skip(f"{name} not installed")
    return path


@settings(max_examples=4, deadline=None)
@given(doc=st.sampled_from(DOCUMENTS), chain=chains(tricky_component))
def test_rewrite_passes_virt_xml_validate(
    tmp_path_factory: pytest.TempPathFactory, doc: tuple[str, str], chain: list[ChainElement]
) -> None:
    tool = _tool("virt-xml-validate")
    _tool("xmllint")
    new = rewrite_disk(source(doc[0]), doc[1], chain)
    path = tmp_path_factory.mktemp("v") / "d.xml"
    path.write_bytes(new)
    result = subprocess.run(
        [tool, str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
