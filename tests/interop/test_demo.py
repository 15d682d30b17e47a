"""The README's main command: tools/demo.py runs the seed scenario end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qemu import require_tool

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = REPO_ROOT / "tools" / "demo.py"


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
