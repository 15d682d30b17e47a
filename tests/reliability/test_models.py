"""pyqcow.testing's generated images read as their model, in pyqcow and in qemu.

These are the strategies' own property tests: every generated image (and every
layer of every generated chain, and every internal snapshot) reads exactly as
the model the strategy returns, through pyqcow and through qemu-img, and
qemu-img check finds nothing wrong with it.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings

import pyqcow
from pyqcow.testing import chains, have_qemu, images

SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck))


def _qemu_read(path: str, fmt: str, tmp_path, snapshot: str | None = None) -> bytes:
    out = tmp_path / "out.raw"
    argv = ["qemu-img", "convert", "-f", fmt, "-O", "raw"]
    if snapshot:
        argv += ["-l", snapshot]
    subprocess.run(argv + [path, str(out)], check=True, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def _qemu_check(path: str) -> None:
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@SETTINGS
@given(img=images(snapshots=2))
def test_generated_images_read_as_model(img, tmp_path_factory):
    try:
        with pyqcow.open(img.path) as q:
            assert q.virtual_size == img.virtual_size
            assert q.read(0, q.virtual_size) == img.expected
            for name, content in img.snapshots.items():
                assert q.snapshot(name).read(0, len(content)) == content
        if have_qemu():
            tmp = tmp_path_factory.mktemp("q")
            _qemu_check(img.path)
            assert _qemu_read(img.path, "qcow2", tmp) == img.expected
            for name, content in img.snapshots.items():
                assert _qemu_read(img.path, "qcow2", tmp, name)[: len(content)] == content
    finally:
        img.cleanup()


@SETTINGS
@given(ch=chains())
def test_generated_chains_read_as_model(ch, tmp_path_factory):
    try:
        for path, fmt, content in zip(ch.layers, ch.formats, ch.expected):
            with pyqcow.open(path) as q:
                assert q.read(0, q.virtual_size) == content
            if have_qemu():
                tmp = tmp_path_factory.mktemp("q")
                assert _qemu_read(path, fmt, tmp) == content
                if fmt == "qcow2":
                    _qemu_check(path)
    finally:
        ch.cleanup()


def test_operations_model_semantics():
    from pyqcow.testing import Op

    model = bytearray(b"x" * 10)
    Op("zero", 2, 3).apply_to_model(model)
    assert model == b"xx\0\0\0xxxxx"
    Op("write", 8, 5, seed=7, pattern=True).apply_to_model(model)
    assert model[8:] == b"\x07\x07" and len(model) == 10


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=300)
@given(img=images(snapshots=3, max_ops=12))
def test_generated_images_read_as_model_many(img, tmp_path_factory):
    test_generated_images_read_as_model.hypothesis.inner_test(img, tmp_path_factory)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_pyqcow_partial_write_into_compressed_cluster(cluster_size, tmp_path):
    """Copy-on-write out of a compressed cluster keeps the rest of the cluster (a
    working-tree mutation of the writer that lost it was caught by the model test)."""
    if not have_qemu():
        if os.environ.get("CI"):
            pytest.fail("qemu-io missing in CI")
        pytest.skip("needs qemu-io to write a compressed cluster")
    path = str(tmp_path / "c.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster_size}", path, str(cluster_size)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -c -P 1 0 {cluster_size}", path], check=True,
                   capture_output=True)
    with pyqcow.open(path, "r+") as img:
        img.write(0, b"\xd8")
    with pyqcow.open(path) as img:
        assert img.read(0, 4) == b"\xd8\x01\x01\x01"
