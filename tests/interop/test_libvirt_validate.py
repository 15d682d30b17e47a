"""libvirt's own schemas as the oracle: every golden domain XML and every
snapshot_xml() output must pass ``virt-xml-validate``.

virt-xml-validate (libvirt-clients) silently needs xmllint (libxml2-utils) to
pick the schema; without it every file fails with "cannot determine schema
type".  Both missing: pytest.fail under CI, pytest.skip elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyqcow.libvirt import ChainElement, rewrite_disk, snapshot_xml

XML_DIR = Path(__file__).resolve().parent.parent / "data" / "xml"
IMG = "/var/lib/libvirt/images/"


def _require(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not installed (virt-xml-validate needs libvirt-clients and libxml2-utils)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def validate():
    tool = _require("virt-xml-validate")
    _require("xmllint")

    def run(path: Path, schema: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool, str(path), schema], capture_output=True, text=True, timeout=60, check=False
        )

    return run


def assert_valid(validate, path: Path, schema: str) -> None:
    result = validate(path, schema)
    assert result.returncode == 0, f"{path.name}: {result.stdout}{result.stderr}"


def golden_files() -> list[Path]:
    return sorted(XML_DIR.glob("*.xml"))


def test_golden_files_present() -> None:
    assert len(golden_files()) >= 12


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.name)
def test_golden_domain_validates(validate, path: Path) -> None:
    assert_valid(validate, path, "domain")


def test_validator_rejects_a_relative_path(validate, tmp_path: Path) -> None:
    # the oracle is not vacuous: libvirt's absFilePath refuses relative names
    bad = (
        (XML_DIR / "overlay-out.xml")
        .read_bytes()
        .replace(b"file='/var/lib/libvirt/images/web01.qcow2'", b"file='web01.qcow2'")
    )
    p = tmp_path / "bad.xml"
    p.write_bytes(bad)
    assert validate(p, "domain").returncode != 0


def test_edge_case_rewrites_validate(validate, tmp_path: Path) -> None:
    src = (XML_DIR / "twodisks-in.xml").read_bytes()
    weird = [
        ChainElement('/var/lib/libvirt/images/it\'s & <fun> "x".qcow2', "qcow2"),
        ChainElement("/var/lib/libvirt/images/caf\u00e9 base.raw", "raw"),
    ]
    outputs = {
        "cdrom.xml": rewrite_disk(src, "sda", [ChainElement(IMG + "install.iso", "raw")]),
        "weird.xml": rewrite_disk(src, "vdb", weird),
        "deep.xml": rewrite_disk(
            src, "vda", [ChainElement(f"{IMG}l{i}.qcow2", "qcow2") for i in range(8)]
        ),
    }
    for name, data in outputs.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert_valid(validate, p, "domain")


SNAPSHOTS = {
    "minimal": {
        "name": "snap1",
        "disks": {"vda": ChainElement(IMG + "web01.snap1.qcow2", "qcow2")},
    },
    "skipped": {
        "name": "nightly-2024-03-01",
        "disks": {"vdb": ChainElement(IMG + "mail02-spool.20240301.qcow2", "qcow2")},
        "skipped": ["vda", "sda"],
        "description": "spool before the upgrade & restart <1>",
        "creation_time": 1709251200,
    },
    "parent": {
        "name": "s2",
        "disks": {"vda": ChainElement(IMG + "web01.s2.qcow2", "qcow2")},
        "parent": "s1",
        "state": "shutoff",
        "creation_time": 1,
    },
    "path-name": {
        "name": "s3",
        "disks": {IMG + "web01.qcow2": ChainElement(IMG + "web01.s3.qcow2", "qcow2")},
    },
}


@pytest.mark.parametrize("case", sorted(SNAPSHOTS))
def test_snapshot_xml_validates(validate, tmp_path: Path, case: str) -> None:
    p = tmp_path / f"{case}.xml"
    p.write_bytes(snapshot_xml(**SNAPSHOTS[case]))
    assert_valid(validate, p, "domainsnapshot")


@pytest.mark.parametrize("case", ["overlay", "twodisks", "replace", "doublequote", "merge"])
def test_snapshot_xml_with_domain_validates(validate, tmp_path: Path, case: str) -> None:
    """The --redefine form: name, state, creationTime and the full <domain>."""
    domain = (XML_DIR / f"{case}-in.xml").read_bytes()
    target = {"replace": "sda", "twodisks": "vdb"}.get(case, "vda")
    out = snapshot_xml(
        f"{case}-snap",
        {target: ChainElement(f"{IMG}{case}.snap.qcow2", "qcow2")},
        creation_time=1700000000,
        domain_xml=domain,
    )
    p = tmp_path / "snap.xml"
    p.write_bytes(out)
    assert_valid(validate, p, "domainsnapshot")


def test_virsh_redefine_accepts_snapshot_xml(tmp_path: Path) -> None:
    """libvirt's own parser (the in-process test:///default driver, no daemon)
    takes the snapshot with --redefine; without <domain> it refuses a new one."""
    virsh = _require("virsh")
    before = (XML_DIR / "twodisks-in.xml").read_bytes()
    after = rewrite_disk(
        before,
        "vdb",
        [
            ChainElement(IMG + "mail02-spool.s1.qcow2", "qcow2"),
            ChainElement(IMG + "mail02-spool.qcow2", "qcow2"),
        ],
    )
    dom = tmp_path / "dom.xml"
    dom.write_bytes(after)
    snap = tmp_path / "snap.xml"
    snap.write_bytes(
        snapshot_xml(
            "s1",
            {"vdb": ChainElement(IMG + "mail02-spool.s1.qcow2", "qcow2")},
            creation_time=1700000000,
            domain_xml=before,
        )
    )
    bare = tmp_path / "bare.xml"
    bare.write_bytes(
        snapshot_xml(
            "s2", {"vdb": ChainElement(IMG + "mail02-spool.s2.qcow2", "qcow2")}, creation_time=1
        )
    )

    def run(commands: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [virsh, "-q", "-c", "test:///default", commands],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run(f"define {dom}; snapshot-create mail02 {snap} --redefine; snapshot-dumpxml mail02 s1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "<state>disk-snapshot</state>" in ok.stdout
    assert "<creationTime>1700000000</creationTime>" in ok.stdout
    assert f"<source file='{IMG}mail02-spool.s1.qcow2'/>" in ok.stdout
    refused = run(f"define {dom}; snapshot-create mail02 {bare} --redefine")
    assert refused.returncode != 0
    assert "missing domain in snapshot" in refused.stderr
