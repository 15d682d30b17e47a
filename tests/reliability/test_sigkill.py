"""Real process deaths: SIGKILL a child running an operation in a loop at a
random moment, then check the copy it was working on (crashkit.verify_state).

Also SIGINT through the CLI: one clear line on stderr, exit status 130, and the
image left consistent (no temp files, same guest data).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import crashkit
import pytest
import scenarios
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from test_crash_inject import fixed_chain

from pyqcow.errors import QcowError
from pyqcow.testing import chains, image_params

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "child.py")

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None and not os.environ.get("CI"), reason="qemu-img is the crash-state oracle"
)

KILL_OPS = ["commit", "commit-b", "stream", "rebase", "rebase-u", "merge-base-commit",
            "merge-base-stream", "merge-top-commit", "merge-top-stream", "convert", "writes",
            "snapshot-create", "snapshot-delete"]


def _kill_once(name: str, ch, sc, seed_: int, rng: random.Random, root: str,
               max_delay: float) -> str:
    os.makedirs(root, exist_ok=True)
    spec = os.path.join(root, "spec.pickle")
    with open(spec, "wb") as f:
        pickle.dump((name, ch, seed_), f)
    runs = os.path.join(root, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(runs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]
                                                     + sys.path))
    proc = subprocess.Popen([sys.executable, CHILD, spec, runs], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        current = os.path.join(runs, "current")
        deadline = time.monotonic() + 30
        while not os.path.exists(current):
            if proc.poll() is not None:
                raise AssertionError(f"child died: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("child did not start")
            time.sleep(0.002)
        time.sleep(rng.uniform(0, max_delay))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(
            f"child exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    with open(os.path.join(runs, "current")) as f:
        it = int(f.read())
    work = os.path.join(runs, f"it{it}")
    try:
        return crashkit.verify_state(work, sc.expect(work))
    except crashkit.Inconsistent as e:
        keep = root + f".failed-{name}-{it}"
        shutil.copytree(work, keep, dirs_exist_ok=True)
        raise crashkit.Inconsistent(f"{name} SIGKILL (kept in {keep}): {e}") from None


def _kill_many(name: str, ch, n: int, seed_: int, tmp: str, failures: list) -> int:
    try:
        sc = scenarios.build(name, ch, seed_)
        crashkit.count_points(ch.directory, ch.directory + ".work", sc.op)
    except QcowError:
        return 0
    shutil.rmtree(ch.directory + ".work", ignore_errors=True)
    # how long one iteration takes, to spread the kills over several of them
    t0 = time.monotonic()
    crashkit.copy_dir(ch.directory, ch.directory + ".timing")
    sc.op(ch.directory + ".timing")
    per_op = time.monotonic() - t0
    shutil.rmtree(ch.directory + ".timing", ignore_errors=True)
    rng = random.Random(seed_)
    done = 0
    for _ in range(n):
        try:
            outcome = _kill_once(name, ch, sc, seed_, rng, tmp, max_delay=max(0.02, 3 * per_op))
        except crashkit.Inconsistent as e:
            failures.append((name, "sigkill", str(e)))
            outcome = "FAILED"
        crashkit.STATS.add(name, "sigkill", outcome)
        done += 1
    return done


def _judge(name, failures):
    from test_crash_inject import KNOWN_BUGS

    if not failures:
        return
    text = "\n".join(f"  {m[:500]}" for _, _, m in failures[:10])
    from test_crash_inject import _is_known

    if all(_is_known(op, "sigkill", m) for op, _, m in failures):
        pytest.xfail(f"known bug ({KNOWN_BUGS[(failures[0][0], 'sigkill')]}):\n{text}")
    pytest.fail(f"{len(failures)} broken crash promises after SIGKILL:\n{text}")


@pytest.mark.parametrize("name", ["merge-base-stream", "writes"])
def test_sigkill_quick(name, tmp_path):
    d = tmp_path / "chain"
    d.mkdir()
    ch = fixed_chain(str(d))
    failures: list = []
    assert _kill_many(name, ch, 3, 5, str(tmp_path / "kill"), failures) == 3
    _judge(name, failures)


KILLS_PER_CHAIN = int(os.environ.get("PYQCOW_KILLS_PER_CHAIN", "8"))


@pytest.mark.slow
@pytest.mark.parametrize("name", KILL_OPS)
def test_sigkill_random_points(name, tmp_path):
    failures: list = []
    root = str(tmp_path / "kill")

    params = image_params(max_clusters=64, refcount_bits=(8, 16, 64))
    strat = (chains(depth=st.integers(1, 2), raw_base=False, params=params, min_ops=4)
             if name.startswith("snapshot") or name == "writes"
             else chains(depth=st.integers(max(scenarios.MIN_DEPTH.get(name, 2), 2), 3),
                         params=params, min_ops=4))

    kills = [0]

    @seed(99)
    @settings(max_examples=2, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(ch=strat, s=st.integers(0, 1000))
    def run(ch, s):
        try:
            kills[0] += _kill_many(name, ch, KILLS_PER_CHAIN, s, root, failures)
        finally:
            ch.cleanup()

    run()
    _judge(name, failures)
    assert kills[0] > 0, f"{name}: no drawn chain allowed the operation: nothing was killed"


# ---------------------------------------------------------------------------- SIGINT
def _big_chain(d: str) -> tuple[str, str, bytes]:
    import pyqcow
    from pyqcow.newimage import create

    size = 48 << 20
    base = os.path.join(d, "base.qcow2")
    create(base, size, cluster_size=65536)
    r = random.Random(1)
    with pyqcow.open(base, "r+") as img:
        for i in range(0, size, 1 << 20):
            img.write(i, r.randbytes(1 << 19))
    top = os.path.join(d, "top.qcow2")
    create(top, size, backing="base.qcow2", backing_format="qcow2")
    with pyqcow.open(top, "r+") as img:
        for i in range(0, size, 4 << 20):
            img.write(i + 4096, r.randbytes(300000))
        expected = img.read(0, size)
    return base, top, expected


KNOWN_SIGINT: dict[str, str] = {}  # command -> reason, for a bug not fixed yet


@pytest.mark.parametrize("command", [["stream"], ["commit"]])
def test_sigint_stops_cleanly(command, tmp_path):
    """SIGINT during a CLI operation: exit 130, one line on stderr, image consistent."""
    src = tmp_path / "pristine"
    src.mkdir()
    _base, _top, expected = _big_chain(str(src))
    rng = random.Random(0)
    interrupted = 0
    failures: list[str] = []
    for attempt in range(6):
        work = tmp_path / f"w{attempt}"
        shutil.copytree(src, work)
        top = str(work / "top.qcow2")
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pyqcow.cli.main import entry; entry()",
             *command, top],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # wait until the operation writes (past start-up), then a random moment
        target = str(work / ("top.qcow2" if command[0] == "stream" else "base.qcow2"))
        m0 = os.stat(target).st_mtime_ns
        deadline = time.monotonic() + 30
        while os.stat(target).st_mtime_ns == m0 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode in (0, -signal.SIGINT):
            # finished before the signal, or it arrived during interpreter shutdown
            # (Python restores the default handler there): the operation completed
            assert not err.strip() or proc.returncode == -signal.SIGINT, err
            crashkit.verify_state(str(work), crashkit.Expect([(top, [expected])]))
            continue
        assert proc.returncode == 130, (proc.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "interrupted" in lines[0], err
        assert "Traceback" not in err
        interrupted += 1
        assert sorted(os.listdir(work)) == ["base.qcow2", "top.qcow2"]  # no temp files
        try:
            outcome = crashkit.verify_state(str(work), crashkit.Expect([(top, [expected])]))
        except crashkit.Inconsistent as e:
            failures.append(str(e))
            outcome = "FAILED"
        crashkit.STATS.add(f"cli-{command[0]}", "sigint", "exit130," + outcome)
    if failures:
        reason = KNOWN_SIGINT.get(command[0])
        text = "\n".join(failures)
        if reason:
            pytest.xfail(f"known bug ({reason}):\n{text}")
        pytest.fail(text)
    if not interrupted:
        pytest.skip("the operation always finished before SIGINT arrived")
