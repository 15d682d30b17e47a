"""pyqcow.testing as a product (issue 17): every promise of the kit, item by item.

The model tests (every image reads as its model in pyqcow and qemu) are in
tests/reliability/test_models.py; this file tests the kit's own contract:
sizes, reprs, honoured switches, feature toggles, reproduce(), shrinking,
run_bounded, invalid_images, temp files, the import check and the speed tricks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, find, given, seed, settings
from hypothesis import strategies as st

import pyqcow
from pyqcow.errors import QcowError
from pyqcow.testing import (
    ReaderFailure,
    _files,
    chains,
    have_qemu,
    image_params,
    images,
    invalid_images,
    run_bounded,
)
from pyqcow.testing.invalid import RULES

REPO = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=10, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.generate])

needs_qemu = pytest.mark.skipif(not have_qemu() and not os.environ.get("CI"),
                                reason="needs qemu-img/qemu-io")


def _qemu_raw(path: str, fmt: str = "qcow2") -> bytes:
    out = path + ".out.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out], check=True,
                   capture_output=True)
    data = Path(out).read_bytes()
    os.unlink(out)
    return data


def _info(path: str) -> dict:
    r = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------- 1. sizes
@needs_qemu
@FAST
@given(img=images(params=image_params(virtual_size=1000, cluster_sizes=(512, 4096)),
                  max_ops=2))
def test_virtual_size_rounds_up_to_512_like_qemu(img):
    assert img.virtual_size == 1024
    assert len(img.expected) == 1024
    assert _info(img.path)["virtual-size"] == 1024
    assert _qemu_raw(img.path) == img.expected


# ---------------------------------------------------------------------------- 2. reprs
@FAST
@given(img=images(params=image_params(cluster_sizes=(65536,), max_clusters=16), min_ops=1),
       ch=chains(depth=2, params=image_params(cluster_sizes=(65536,), max_clusters=16)))
def test_reprs_leave_the_bytes_out(img, ch):
    r = repr(img)
    assert len(r) < 4000, len(r)
    assert "expected=<" in r and "bytes sha256:" in r
    assert repr(img.expected[:64])[2:40] not in r or img.expected[:64] == bytes(64)
    rc = repr(ch)
    assert len(rc) < 6000, len(rc)
    assert "b'\\x" not in rc and "bytes sha256:" in rc


# ---------------------------------------------------------------------------- 3. honoured
def _draws(strategy, n=40):
    out = []

    @seed(3)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(x=strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


def test_extended_l2_true_is_honoured():
    ps = _draws(image_params(extended_l2=(True,)))
    assert ps and all(p.extended_l2 and p.compat == "1.1" and p.cluster_size >= 16384
                      for p in ps)


def test_refcount_bits_without_16_means_v3():
    ps = _draws(image_params(refcount_bits=(1,)))
    assert ps and all(p.refcount_bits == 1 and p.compat == "1.1" for p in ps)


@pytest.mark.parametrize("kwargs,match", [
    (dict(extended_l2=(True,), compat=("0.10",)), "extended_l2 .*need compat 1.1"),
    (dict(extended_l2=(True,), cluster_sizes=(512, 4096)), "at least 16 KiB"),
    (dict(refcount_bits=(8,), compat=("0.10",)), "need compat 1.1"),
    (dict(data_file=True, creators=("pyqcow",)), "data_file=.*needs qemu-img as a creator"),
    (dict(writers=("qemu-io", "cp")), "writers must be"),
    (dict(cluster_sizes=(3000,)), "powers of two"),
])
def test_impossible_combinations_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_params(**kwargs)


def test_overlay_with_pyqcow_creator_only_refused_for_small_clusters():
    with pytest.raises(ValueError, match="under 4 KiB need qemu-img"):
        chains(params=image_params(creators=("pyqcow",), cluster_sizes=(512, 1024)))


@FAST
@given(ch=chains(depth=3, raw_base=False,
                 params=image_params(creators=("pyqcow",), max_clusters=8)))
def test_creators_pyqcow_is_honoured_in_chains(ch):
    assert all(p.creator == "pyqcow" for p in ch.params)
    assert all(p.cluster_size >= 4096 for p in ch.params[:-1])  # overlays


def _l2_entry(path: str, guest: int) -> int:
    """The L2 entry mapping ``guest`` (standard L2 entries)."""
    with open(path, "rb") as f:
        data = f.read()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    per = cs // 8
    l1e = struct.unpack_from(">Q", data, l1_off + 8 * (guest // cs // per))[0]
    l2 = l1e & 0x00FFFFFFFFFFFE00
    return struct.unpack_from(">Q", data, l2 + 8 * (guest // cs % per))[0] if l2 else 0


@needs_qemu
def test_writers_pyqcow_writes_compressed_clusters_itself(monkeypatch, tmp_path):
    from pyqcow.testing import _qemuio, guestops

    def no_qemu_io(*a, **kw):
        raise AssertionError("qemu-io used although writers=('pyqcow',)")

    monkeypatch.setattr(_qemuio, "run", no_qemu_io)
    monkeypatch.setattr(guestops, "_apply_qemu_io", no_qemu_io)
    seen = []

    @settings(max_examples=15, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(img=images(params=image_params(writers=("pyqcow",), compat=("1.1",),
                                          cluster_sizes=(4096,)), min_ops=3,
                      directory=tmp_path))
    def run(img):
        comp = [op for i, op in enumerate(img.ops) if op.kind == "compressed" and not any(
            o.offset < op.offset + op.length and op.offset < o.offset + o.length
            for o in img.ops[i + 1:])]  # not overwritten later
        if comp:
            assert all(_l2_entry(img.path, op.offset) >> 62 & 1 for op in comp), img
            assert _qemu_raw(img.path) == img.expected
            seen.append(img)

    run()
    assert seen, "no compressed write drawn"


# ---------------------------------------------------------------------------- 4. toggles
@FAST
@given(img=images(params=image_params(compressed=False, zero_clusters=False, discard=False),
                  min_ops=4))
def test_toggles_off_mean_no_such_operations(img):
    assert {op.kind for op in img.ops} <= {"write"}


@needs_qemu
@settings(max_examples=6, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(img=images(params=image_params(data_file=True, bitmaps=True, unknown_extensions=True,
                                      dirty=True, max_clusters=8), min_ops=1))
def test_toggles_on_add_their_feature(img):
    info = _info(img.path)
    spec = info["format-specific"]["data"]
    assert spec.get("data-file") and os.path.exists(img.data_file)
    assert [b["name"] for b in spec.get("bitmaps", [])] == ["bitmap0"]
    with open(img.path, "rb") as f:
        head = f.read(img.cluster_size)
    assert struct.unpack_from(">Q", head, 72)[0] & 1  # dirty
    assert struct.pack(">I", 0x70797163) in head  # the unknown extension
    assert _qemu_raw(img.path) == img.expected
    with pyqcow.open(img.path) as q:
        assert q.read(0, q.virtual_size) == img.expected


@needs_qemu
@FAST
@given(img=images(params=image_params(corrupt=True, max_clusters=8), min_ops=1))
def test_corrupt_bit_toggle(img):
    with open(img.path, "rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & 2
    assert _qemu_raw(img.path) == img.expected


@FAST
@given(ch=chains(params=[image_params(compat=("1.1",), cluster_sizes=(65536,)),
                         image_params(compat=("0.10",), cluster_sizes=(4096,))],
                 raw_base=False))
def test_chains_take_per_layer_params_top_first(ch):
    assert ch.depth == 2
    assert (ch.params[0].compat, ch.params[0].cluster_size) == ("1.1", 65536)
    assert (ch.params[1].compat, ch.params[1].cluster_size) == ("0.10", 4096)


def test_per_layer_params_and_a_different_depth_refused():
    with pytest.raises(ValueError, match="2 per-layer params but depth=3"):
        chains(depth=3, params=[image_params(), image_params()])


# ---------------------------------------------------------------------------- 5. reproduce
def _run_script(script: str, d: Path) -> subprocess.CompletedProcess:
    d.mkdir()
    (d / "r.sh").write_text(script)
    return subprocess.run(["sh", "r.sh"], cwd=d, capture_output=True, text=True)


@needs_qemu
@settings(max_examples=5, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(img=images(snapshots=1, min_ops=2), ch=chains(subdir=True))
def test_reproduce_scripts_rebuild_the_same_content(img, ch, tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    r = _run_script(img.reproduce(), d / "img")
    assert r.returncode == 0, img.reproduce() + r.stdout + r.stderr
    assert ": OK" in r.stdout
    r = _run_script(ch.reproduce(), d / "chain")
    assert r.returncode == 0, ch.reproduce() + r.stdout + r.stderr
    assert ": OK" in r.stdout


KEEP_TEST = """
import os, sys
from hypothesis import given, settings, Phase
from pyqcow.testing import images, image_params
@settings(max_examples=20, database=None, deadline=None)
@given(img=images(params=image_params(cluster_sizes=(4096,), max_clusters=4), min_ops=1))
def test_fails(img):
    assert not any(op.kind == "write" for op in img.ops)
try:
    test_fails()
except AssertionError:
    import traceback
    traceback.print_exc()
    print("FAILED")
"""


@needs_qemu
def test_keep_failing_keeps_the_minimal_example_with_a_script(tmp_path):
    env = dict(os.environ, PYQCOW_TESTING_KEEP="failing", PYQCOW_TESTING_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", KEEP_TEST], env=env, capture_output=True,
                       text=True, timeout=300)
    assert "FAILED" in r.stdout, r.stdout + r.stderr
    assert "pyqcow.testing: files kept in" in r.stdout + r.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("pyqcow-testing-")]
    assert len(kept) == 1, kept  # only the failing one, the others were removed
    assert (kept[0] / "image.qcow2").exists()
    r = _run_script((kept[0] / "reproduce.sh").read_text(), tmp_path / "again")
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------- 6. shrinking
def _shrunk_chain(rng_seed: int):
    return find(chains(depth=st.integers(2, 4), raw_base=False, max_ops=4),
                lambda c: any(len(c.expected[i]) > len(c.expected[i + 1])
                              for i in range(c.depth - 1)),
                settings=settings(max_examples=200, database=None, deadline=None,
                                  suppress_health_check=list(HealthCheck)),
                random=random.Random(rng_seed))


@pytest.mark.parametrize("rng_seed", [3, 5])  # these stayed at 4 layers before
def test_chains_shrink_to_two_layers_and_no_ops(rng_seed):
    """A "bug" needing an overlay larger than its backing file shrinks to the
    smallest chain that has one: two layers, no operations."""
    ch = _shrunk_chain(rng_seed)
    assert ch.depth == 2
    assert ch.ops == [[], []]
    assert len(ch.expected[0]) == len(ch.expected[1]) + 512


@pytest.mark.slow
def test_chains_shrink_to_two_layers_most_of_the_time():
    """Before: 4 of 10 seeds reached two layers; now 9 of 10 (seed 8 stays at 4)."""
    depths = [_shrunk_chain(s).depth for s in range(10)]
    assert depths.count(2) >= 9, depths


def test_images_shrink_to_one_small_write():
    img = find(images(), lambda i: any(op.kind == "write" for op in i.ops),
               settings=settings(max_examples=200, database=None, deadline=None,
                                 suppress_health_check=list(HealthCheck)))
    assert len(img.ops) == 1 and img.ops[0].length == 1 and img.ops[0].offset == 0
    assert img.cluster_size == 512 and img.virtual_size == 512


# ---------------------------------------------------------------------------- 7. run_bounded
def _hang():
    while True:
        time.sleep(0.01)


def _hog():
    chunks = []
    while True:
        chunks.append(bytearray(64 << 20))


def test_run_bounded_returns_values_and_reraises_exceptions():
    assert run_bounded(lambda a, b=0: a + b, 2, b=3, timeout=10) == 5
    with pytest.raises(ValueError, match="bad image"):
        run_bounded(lambda: (_ for _ in ()).throw(ValueError("bad image")), timeout=10)


def test_run_bounded_reports_a_hang_as_a_failure():
    t = time.monotonic()
    with pytest.raises(ReaderFailure, match="did not finish within 0.5 s") as e:
        run_bounded(_hang, timeout=0.5)
    assert e.value.kind == "timeout" and time.monotonic() - t < 5


def test_run_bounded_memory_bound():
    with pytest.raises(ReaderFailure, match="memory") as e:
        run_bounded(_hog, timeout=20, memory=256 << 20)
    assert e.value.kind in ("memory", "signal")


def _open_garbage(path):
    with pyqcow.open(path):
        pass


def test_run_bounded_brings_back_exceptions_that_do_not_unpickle(tmp_path):
    """QcowError(path, msg) does not unpickle as itself: the showcase saw "exited
    without a result" (a ReaderFailure) for pyqcow refusing an image."""
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfa" + bytes(508))
    r = run_bounded(_open_garbage, str(bad), timeout=20, raise_errors=False)
    assert r.kind == "exception", r
    assert "bad.qcow2" in str(r.error)


def test_run_bounded_crash_and_no_raise_mode():
    r = run_bounded(lambda: os.kill(os.getpid(), signal.SIGKILL), timeout=10,
                    raise_errors=False)
    assert not r.ok and r.kind == "signal" and "SIGKILL" in r.message
    assert run_bounded(lambda: b"x" * 10, raise_errors=False).value == b"x" * 10


# ---------------------------------------------------------------------------- 8. invalid
def _pyqcow_refuses(bad) -> str:
    """Where pyqcow refuses ``bad``: open, read or check (or "" when it never does)."""
    from pyqcow.ops.check import check

    try:
        img = pyqcow.open(bad.path, force_share=True)
    except QcowError:
        return "open"
    try:
        with img:
            img.read(0, img.virtual_size)
    except QcowError:
        return "read"
    try:
        res = check(bad.path, force_share=True)
    except QcowError:
        return "check"
    return "check" if res.corruptions or res.check_errors or res.leaks else ""


@needs_qemu
@pytest.mark.parametrize("rule", list(RULES))
def test_invalid_images_break_their_rule_for_qemu_and_pyqcow(rule):
    @settings(max_examples=3, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(bad=invalid_images(rules=[rule]))
    def run(bad):
        assert bad.rule == rule and bad.description
        assert len(repr(bad)) < 3000
        info = subprocess.run(["qemu-img", "info", "-f", "qcow2", bad.path],
                              capture_output=True, text=True)
        conv = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", bad.path,
                               bad.path + ".raw"], capture_output=True, text=True)
        chk = subprocess.run(["qemu-img", "check", "-f", "qcow2", bad.path],
                             capture_output=True, text=True)
        if bad.detected == "open":
            assert info.returncode != 0, (bad, info.stdout)
        elif bad.detected == "read":
            assert info.returncode == 0 and conv.returncode != 0, (bad, conv.stderr)
        else:
            assert chk.returncode != 0, (bad, chk.stdout)
        where = _pyqcow_refuses(bad)
        assert where, f"pyqcow accepts {bad}"
        if bad.detected == "open":
            assert where == "open", (bad, where)

    run()


def test_invalid_images_unknown_rule_refused():
    with pytest.raises(ValueError, match="unknown rules \\['no-such-rule'\\]"):
        invalid_images(rules=["no-such-rule"])


@needs_qemu
@settings(max_examples=3, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(bad=invalid_images(rules=["l2-entry-unaligned"]))
def test_invalid_image_reproduce_script(bad, tmp_path_factory):
    d = tmp_path_factory.mktemp("inv") / "x"
    d.mkdir()
    (d / "r.sh").write_text(bad.reproduce())
    r = subprocess.run(["sh", "r.sh"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (d / os.path.basename(bad.path)).read_bytes() == Path(bad.path).read_bytes()


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_fuzz_mutations_are_public_and_shrinkable(tmp_path):
    from pyqcow.testing.mutations import apply_mutations, mutations

    img = images(directory=tmp_path, max_ops=1).example()
    data = Path(img.path).read_bytes()
    muts = find(mutations(data), lambda ms: apply_mutations(data, ms)[:4] != data[:4],
                settings=settings(database=None, suppress_health_check=list(HealthCheck)))
    assert len(muts) == 1


# ---------------------------------------------------------------------------- 9. temp files
def _dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith("pyqcow-testing-")]


def test_each_example_is_removed_when_it_ends(tmp_path):
    seen = []

    @settings(max_examples=20, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(img=images(directory=tmp_path, max_ops=1))
    def run(img):
        assert Path(img.path).is_relative_to(tmp_path)
        seen.append(img.directory)

    run()
    _files.drain()
    assert len(seen) >= 10
    assert _dirs(tmp_path) == []


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_stale_directories_of_dead_processes_are_swept(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f"pyqcow-testing-{p.pid}-abc"
    stale.mkdir()
    (stale / "image.qcow2").write_bytes(b"x")
    mine = tmp_path / f"pyqcow-testing-{os.getpid()}-live"
    mine.mkdir()
    images(directory=tmp_path, max_ops=0).example()
    assert not stale.exists() and mine.exists()


def test_sigterm_removes_the_directories(tmp_path):
    code = ("import os, signal, time\n"
            "from pyqcow.testing import images\n"
            f"img = images(directory={str(tmp_path)!r}, max_ops=1).example()\n"
            "assert os.path.exists(img.path)\n"
            "print('made', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "made"
    assert _dirs(tmp_path)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGTERM
    assert _dirs(tmp_path) == []


def test_cleanup_thread_leaves_sigterm_to_the_main_thread(tmp_path):
    """The background remover blocks SIGTERM and SIGINT: the kernel then delivers
    them to the main thread, whose handler cleans up even while it sleeps in a
    system call (test_sigterm_removes_the_directories timed out when the signal
    went to the remover)."""
    from pyqcow.testing import _files

    d = tmp_path / "gone"
    d.mkdir()
    _files.remove_later(str(d))
    _files.drain()  # the thread has run; start a fresh one to look at
    d.mkdir()
    _files.remove_later(str(d))
    tid = _files._REMOVER[0].native_id
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
    _files.drain()
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert blocked & (1 << (sig - 1)), f"{sig.name} not blocked in the remover: {blocked:#x}"
    assert not d.exists()


def test_tmp_path_with_data_draw(tmp_path):
    @settings(max_examples=3, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        img = data.draw(images(directory=tmp_path, max_ops=1))
        assert Path(img.path).parent.parent == tmp_path

    run()


# ---------------------------------------------------------------------------- 10. name clash
def test_import_fails_clearly_when_pyqcow_is_another_module(tmp_path):
    other = tmp_path / "pyqcow"  # a user's checkout called pyqcow (no __init__.py)
    other.mkdir()
    code = ("import sys, types\n"
            "ns = types.ModuleType('pyqcow')\n"
            f"ns.__path__ = [{str(other)!r}, {str(REPO / 'pyqcow')!r}]\n"
            "sys.modules['pyqcow'] = ns\n"
            "import pyqcow.testing\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError: pyqcow.testing: the module named 'pyqcow' comes from" in r.stderr
    assert "shadows it" in r.stderr


# ---------------------------------------------------------------------------- 11. speed
@needs_qemu
@pytest.mark.parametrize("opts", [
    "cluster_size=65536,compat=1.1,refcount_bits=16,extended_l2=off",
    "cluster_size=16384,compat=1.1,refcount_bits=1,extended_l2=on,compression_type=zstd",
    "cluster_size=512,compat=0.10,refcount_bits=16",
])
def test_qemu_create_cache_writes_what_qemu_img_writes(opts, tmp_path):
    """The speed trick for qemu-img-made images: a cached file with the size field
    patched is byte for byte what qemu-img create writes."""
    from pyqcow.testing.imagegen import ImageParams, _create

    kw = dict(x.split("=") for x in opts.split(","))
    p = ImageParams(virtual_size=0, cluster_size=int(kw["cluster_size"]), compat=kw["compat"],
                    refcount_bits=int(kw["refcount_bits"]),
                    extended_l2=kw.get("extended_l2") == "on",
                    compression_type=kw.get("compression_type", "zlib"), creator="qemu-img")
    for size in (p.cluster_size, 3 * p.cluster_size + 512, 7 * p.cluster_size):
        q = ImageParams(**{**p.__dict__, "virtual_size": size})
        _create(str(tmp_path / f"k{size}.qcow2"), q)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", q.qemu_options(),
                        str(tmp_path / f"q{size}.qcow2"), str(size)], check=True)
        assert (tmp_path / f"k{size}.qcow2").read_bytes() == \
            (tmp_path / f"q{size}.qcow2").read_bytes()


def test_bench_testing_reports_images_and_chains_per_second():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_testing.py"), "--images", "5",
                        "--chains", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "images " in r.stdout and "chains " in r.stdout and "/s" in r.stdout


# ---------------------------------------------------------------------------- the showcase
def test_showcase_runs_and_falls_back_to_pyqcow(tmp_path):
    """tools/showcase: with no way to install dissect.hypervisor (its cache dir cannot
    be made), it says so and tests pyqcow's own reader, which passes."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "showcase_testing.py"),
                        "--examples", "4", "--cache-dir", str(blocker / "cache")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "dissect.hypervisor unavailable" in r.stdout
    assert "reader under test: pyqcow" in r.stdout
    assert "0 of 5 properties failed for pyqcow" in r.stdout, r.stdout


# ---------------------------------------------------------------------------- 4. all toggles
ALL_TOGGLES = image_params(compressed=(False, True), zero_clusters=(False, True),
                           discard=(False, True), data_file=(False, True),
                           bitmaps=(False, True), unknown_extensions=(False, True),
                           dirty=(False, True), corrupt=(False, True), max_clusters=16)


@needs_qemu
@pytest.mark.filterwarnings("ignore:.*marked corrupt")
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(ch=chains(params=ALL_TOGGLES, raw_base=False))
def test_every_toggle_mix_reads_as_its_model_in_qemu_and_pyqcow(ch):
    for path, content, p in zip(ch.layers, ch.expected, ch.params, strict=True):
        assert _qemu_raw(path) == content, p
        with pyqcow.open(path) as q:
            assert q.read(0, q.virtual_size) == content, p
        r = subprocess.run(["qemu-img", "check", "-U", path], capture_output=True, text=True)
        assert r.returncode == 0 or (p.dirty and r.returncode == 3), (p, r.stdout, r.stderr)
