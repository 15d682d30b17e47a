"""The README's main command: tools/demo.py runs the seed scenario end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qemu import require_tool

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = REPO_ROOT / "tools" / "demo.py"


WRAPPER = REPO_ROOT / "tools" / "demo"


def _repo_state() -> set[str]:
    return {p.name for p in REPO_ROOT.iterdir()}


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """tools/demo run from another directory writes ./demo-out there (README), not
    into the repository."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    out = cwd / "demo-out"
    repo_demo_out = REPO_ROOT / "demo-out"
    before = repo_demo_out.stat().st_mtime_ns if repo_demo_out.exists() else None
    proc = subprocess.run(
        ["bash", str(WRAPPER)],
        capture_output=True, text=True, timeout=600, check=False, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.is_dir() and (out / ".pyqcow-demo").is_file()
    after = repo_demo_out.stat().st_mtime_ns if repo_demo_out.exists() else None
    assert after == before, "the demo wrote into the repository"
    assert sorted(p.name for p in cwd.iterdir()) == ["demo-out"]
    text = proc.stdout
    for line in (
        "== 3. External snapshot",
        "== 5. Merge plan (dry run)",
        "== 6. Merge, keeping the base's file name",
        "== 8. Verify with qemu-img",
        "  via:     commit (the cheaper direction)",
        "Images are identical.",
        "No errors were found on the image.",
        "demo: OK",
    ):
        assert line in text, f"missing {line!r} in demo output:\n{text}"
    # the external snapshot pointed the XML at new -> base; the merge back at base
    assert f"+      <source file='{out}/new.qcow2'/>" in text
    assert f"+      <source file='{out}/base.qcow2'/>" in text
    assert sorted(p.name for p in out.glob("*.qcow2")) == ["base.qcow2"]
    dom = (out / "dom.xml").read_text()
    assert f"<source file='{out}/base.qcow2'/>" in dom
    assert "new.qcow2" not in dom
    # the same story on a libvirt-managed domain (isolated instance); it needs root and
    # libvirt-python, which CI installs, so under CI it must have run
    if os.environ.get("CI") or "libvirt part skipped" not in text:
        for line in ("== 10. pyqcow domain snapshot", "== 12. pyqcow domain merge",
                     "demo: OK: libvirt's domain names vm.qcow2 again"):
            assert line in text, f"missing {line!r} in demo output:\n{text}"
        assert sorted(p.name for p in (out / "libvirt").glob("vm.*")) == ["vm.qcow2", "vm.xml"]


def test_demo_reruns_over_its_own_output(tmp_path: Path) -> None:
    from importlib import util

    spec = util.spec_from_file_location("pyqcow_demo_tool", DEMO)
    demo = util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo-out"
    demo.prepare_out(out)
    (out / "base.qcow2").write_bytes(b"old run")
    demo.prepare_out(out)  # made by the demo: recreated
    assert sorted(p.name for p in out.iterdir()) == [".pyqcow-demo"]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_demo_refuses_to_clobber_a_directory_it_did_not_make(tmp_path: Path, kind: str) -> None:
    precious = tmp_path / "demo-out"
    if kind == "dir":
        precious.mkdir()
        (precious / "thesis.tex").write_text("years of work")
    else:
        precious.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=60, check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"demo: {precious} exists and "), proc.stderr
    assert "not " in proc.stderr and "--out" in proc.stderr
    if kind == "dir":
        assert (precious / "thesis.tex").read_text() == "years of work"
    else:
        assert precious.read_text() == "not a directory"
