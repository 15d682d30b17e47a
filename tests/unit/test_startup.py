"""Start-up: each command imports only what it needs (issue 14, item 3).

Timing is tools/bench startup's job; these tests guard the cause without a clock:
a fresh interpreter runs one command through ``pyqcow.cli.main.main`` and
reports ``sys.modules``.  construct (~17 ms), lxml, the check/snapshot/bitmap
code and the test libraries must not load for a command on an image that does
not need them, nor argparse when pyqcow.cli.fastargs reads the command line.  Also: every subcommand's ``--help`` still works on its own, and
layout.py's compiled (struct) form agrees with its construct declarations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemu import bitmap_add, create, qemu_io, snapshot_create

from pyqcow import _layout_compiled, layout
from pyqcow.cli.main import SUBCOMMANDS

#: Never needed by a command on an image without XML, snapshots or bitmaps.
HEAVY = ("construct", "lxml", "libvirt", "hypothesis", "pytest", "pyqcow.libvirt",
         "pyqcow.domain", "pyqcow.forensic", "pyqcow.testing")
#: What none of the five start-up commands needs: standard modules (setuptools' default
#: editable finder loaded pathlib and urllib at every start; argparse's help formatter,
#: shutil with bz2 and lzma; --debug, traceback; `python -m`, runpy; gettext's catalogue
#: search, locale: cli/main.py's _argparse_without_catalogue; math and zlib, shared
#: libraries to load in some Python builds), compressed clusters, the copy and read
#: paths, and libyal's API (pyqcow/__init__ loads it on first use).
STDLIB_NEVER = ("pathlib", "urllib", "tempfile", "shutil", "subprocess", "threading", "bz2",
                "lzma", "traceback", "json", "runpy", "locale", "math", "zlib",
                "pyqcow.compressed", "pyqcow.ops.copier", "pyqcow.fastcopy", "pyqcow.reader",
                "pyqcow.libyal")
#: The write path: an image makes its writer (pyqcow.writer) on its first write.
WRITE_PATH = ("pyqcow.writer", "pyqcow.guestwrite", "pyqcow.reshape")
#: dataclasses imports inspect (ast, dis, tokenize...); typing: both cost milliseconds.
#: None of the five start-up commands loads them (test_small_commands_load_no_argparse).
DATACLASSES = ("dataclasses", "inspect", "ast", "typing")

# (io and sys are loaded by every interpreter, and argparse by every command; the
# probe imports nothing else before the command has run, so that the list is the
# command's own.  It also records the subcommand parsers that were built.)
_PROBE = r"""
import argparse, io, sys
built = []  # the subcommand parsers the command built
_add_parser = argparse._SubParsersAction.add_parser
def add_parser(self, name, **kwargs):
    built.append(name)
    return _add_parser(self, name, **kwargs)
argparse._SubParsersAction.add_parser = add_parser
from pyqcow.cli.main import main
stdout, stderr = sys.stdout, sys.stderr
sys.stdout, sys.stderr = out, err = io.StringIO(), io.StringIO()
try:
    status = main(sys.argv[1:])
finally:
    sys.stdout, sys.stderr = stdout, stderr
modules = sorted(sys.modules)
import json
json.dump({"status": status, "stderr": err.getvalue(), "modules": modules,
           "subparsers": built}, sys.stdout)
"""


def probe(cwd: Path, *argv: str) -> dict:
    """Run ``pyqcow ARGV`` (which must succeed) in a fresh interpreter: the modules it
    holds afterwards ("modules") and the subcommand parsers it built ("subparsers")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["LC_ALL"] = "C"  # (as tools/bench startup runs it)
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert result["status"] == 0, result["stderr"]
    return result


def modules_after(cwd: Path, *argv: str) -> set[str]:
    """The modules a fresh interpreter holds after ``pyqcow ARGV`` (which must succeed)."""
    return set(probe(cwd, *argv)["modules"])


def loaded(modules: set[str], names) -> list[str]:
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    create(tmp_path / "base.qcow2", "64M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x5a 0 1M")
    create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    create(tmp_path / "ov.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    return tmp_path


def test_info_on_a_plain_image_loads_no_construct_xml_snapshot_bitmap_or_check(chain) -> None:
    for argv in (["info", "top.qcow2"], ["info", "--output=json", "top.qcow2"]):
        mods = modules_after(chain, *argv)
        assert loaded(mods, HEAVY + ("pyqcow.scan", "pyqcow.repair", "pyqcow.snapshot", "pyqcow.snapshot_table",
                                     "pyqcow.bitmaps", "pyqcow.bitmap_directory",
                                     "pyqcow.newimage", "pyqcow.ops", "pyqcow.mapping")
                      + WRITE_PATH) == []
        assert loaded(mods, STDLIB_NEVER + DATACLASSES) == []
        # no table is read, so no array module (whose import brings collections: ~2 ms;
        # the probe itself has collections, through argparse)
        assert "array" not in mods
        assert "pyqcow.cli.info" in mods  # (the probe did run the command)


def test_check_loads_the_repair_code_only_to_repair(chain) -> None:
    """pyqcow.repair is ~1 ms of check's start-up: only -r needs it."""
    assert "pyqcow.repair" not in modules_after(chain, "check", "top.qcow2")
    assert "pyqcow.repair" in modules_after(chain, "check", "-r", "leaks", "top.qcow2")


def test_info_loads_the_snapshot_and_bitmap_code_for_an_image_that_has_them(chain) -> None:
    snapshot_create(chain / "base.qcow2", "s1")
    bitmap_add(chain / "base.qcow2", "b1")
    mods = modules_after(chain, "info", "--output=json", "base.qcow2")
    assert {"pyqcow.snapshot_table", "pyqcow.bitmap_directory"} <= mods
    # their fixed-size entries parse through layout's compiled form, too
    assert loaded(mods, HEAVY) == []


@pytest.mark.parametrize("argv", [
    ("map", "top.qcow2"),
    ("map", "--output=json", "top.qcow2"),
    ("check", "top.qcow2"),
    ("create", "-q", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"),
    ("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"),
], ids=" ".join)
def test_small_commands_load_no_construct_or_xml(chain, argv) -> None:
    mods = modules_after(chain, *argv)
    assert loaded(mods, HEAVY + STDLIB_NEVER) == []
    if argv[0] != "check":
        assert loaded(mods, ("pyqcow.scan", "pyqcow.repair", "pyqcow.snapshot", "pyqcow.snapshot_table",
                             "pyqcow.bitmaps", "pyqcow.bitmap_directory")) == []
    if argv[0] not in ("map", "check"):
        assert "pyqcow.mapping" not in mods
    if argv[0] in ("map", "check"):  # read-only: the write path loads on first write
        assert loaded(mods, WRITE_PATH) == []
    if argv[0] == "create":
        assert loaded(mods, DATACLASSES) == []


#: What the five start-up commands do not load when their command line is read without
#: argparse (pyqcow.cli.fastargs): argparse and its re and gettext, main's argparse half
#: (pyqcow.cli.parser); signal (it makes enums of its constants: entry uses _signal);
#: enum (spec and entries declare their constants with pyqcow.intenum).
#: (contextlib with functools and types: ~2 ms; check loaded it for two context managers)
FAST_NEVER = ("argparse", "re", "gettext", "locale", "signal", "pyqcow.cli.parser", "enum",
              "contextlib", "functools")

# (no argparse here: the list is the command's own; sys.modules written without json,
# which imports re)
_FAST_PROBE = r"""
import io, sys
from pyqcow.cli.main import main
stdout, stderr = sys.stdout, sys.stderr
sys.stdout, sys.stderr = out, err = io.StringIO(), io.StringIO()
try:
    status = main(sys.argv[1:])
finally:
    sys.stdout, sys.stderr = stdout, stderr
sys.stdout.write(f"{status}\n{err.getvalue()!r}\n" + "\n".join(sorted(sys.modules)))
"""

#: tools/bench startup's command lines
BENCH_ARGV = [
    ("info", "top.qcow2"),
    ("map", "top.qcow2"),
    ("check", "top.qcow2"),
    ("create", "-q", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"),
    ("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"),
]


@pytest.mark.parametrize("argv", [*BENCH_ARGV, ("info", "--output=json", "top.qcow2"),
                                  ("map", "--output", "json", "-U", "top.qcow2")], ids=" ".join)
def test_small_commands_load_no_argparse(chain, argv) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run([sys.executable, "-c", _FAST_PROBE, *argv], cwd=chain, env=env,
                          capture_output=True, text=True, check=True)
    status, stderr, *modules = proc.stdout.split("\n")
    assert (status, stderr) == ("0", "''")
    assert loaded(set(modules), FAST_NEVER + HEAVY + STDLIB_NEVER + DATACLASSES) == []
    assert f"pyqcow.cli.{argv[0]}" in modules


@pytest.mark.parametrize("argv", [
    ("commit", "top.qcow2"),
    ("stream", "-q", "top.qcow2"),
    ("rebase", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"),
    ("convert", "-O", "raw", "top.qcow2", "out.raw"),
    ("convert", "-O", "qcow2", "top.qcow2", "out.qcow2"),
], ids=" ".join)
def test_chain_commands_load_no_dataclasses_argparse_or_typing(chain, argv) -> None:
    """tools/bench chain's commands: their whole run is a few tenths of a second on
    reflink XFS, where dataclasses (inspect, ast...) and argparse were ~15 ms."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run([sys.executable, "-c", _FAST_PROBE, *argv], cwd=chain, env=env,
                          capture_output=True, text=True, check=True)
    status, _stderr, *modules = proc.stdout.split("\n")  # (commit warns: ov.qcow2 shares base)
    assert status == "0"
    assert loaded(set(modules), ("argparse", "re", "enum", "logging", "concurrent",
                                 "pyqcow.cli.parser") + DATACLASSES) == []
    assert f"pyqcow.cli.{argv[0]}" in modules


@pytest.mark.parametrize("argv", [
    # (each line in a form the fast reading leaves to argparse: an abbreviated option,
    # "-xVALUE" with "=", an option with its own argparse action)
    ("info", "--outp=human", "top.qcow2"),
    ("map", "--outp=human", "top.qcow2"),
    ("check", "--outp=human", "top.qcow2"),
    ("create", "-q", "-ocluster_size=64k", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"),
    ("rebase", "-t", "writeback", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"),
], ids=" ".join)
def test_a_command_builds_only_its_own_parser(chain, argv) -> None:
    """Not a subparser for each of the other commands (nor imports their modules)."""
    result = probe(chain, *argv)
    assert result["subparsers"] == [argv[0]]
    others = {f"pyqcow.cli.{c}" for c in SUBCOMMANDS} - {f"pyqcow.cli.{argv[0]}"}
    # (create and rebase use cli/xml.py's --domain-xml helpers, not the xml command)
    others -= {"pyqcow.cli.xml"} if argv[0] in ("create", "rebase") else set()
    assert sorted(others & set(result["modules"])) == []


@pytest.mark.parametrize("argv", BENCH_ARGV, ids=" ".join)
def test_the_fast_reading_builds_no_argparse_parser(chain, argv) -> None:
    result = probe(chain, *argv)
    assert result["subparsers"] == []  # (the probe loads argparse itself, to see this)
    others = {f"pyqcow.cli.{c}" for c in SUBCOMMANDS} - {f"pyqcow.cli.{argv[0]}"}
    others -= {"pyqcow.cli.xml"} if argv[0] in ("create", "rebase") else set()
    assert sorted(others & set(result["modules"])) == []


def test_root_help_builds_every_subcommand_parser(tmp_path) -> None:
    result = probe(tmp_path, "--help")
    assert set(SUBCOMMANDS) <= set(result["subparsers"])  # (and nested ones: domain ...)


def test_create_with_domain_xml_still_loads_libvirt(chain) -> None:
    """The XML code loads when XML is in play (the lazy import is not a lost one)."""
    xml = chain / "dom.xml"
    xml.write_text(
        "<domain type='kvm'><name>d</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{chain / 'base.qcow2'}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>\n"
    )
    mods = modules_after(chain, "create", "-q", "-b", "base.qcow2", "-F", "qcow2",
                         "--domain-xml", str(xml), "--disk", "vda", "new.qcow2")
    assert {"pyqcow.libvirt", "lxml.etree"} <= mods
    assert str(chain / "new.qcow2") in xml.read_text()


@pytest.mark.parametrize("argv", [
    ("info", "top.qcow2"),
    ("create", "-q", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"),
], ids=" ".join)
def test_the_installed_command_imports_no_finder_runpy_or_dataclasses(chain, argv) -> None:
    """The whole process as users start it (the launcher, site, the install): what it
    imports, from Python's own -X importtime list (PYTHONPROFILEIMPORTTIME)."""
    launcher = Path(sys.executable).with_name("pyqcow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run([str(launcher), *argv], cwd=chain, capture_output=True, text=True,
                          env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    # (the list leaves out what importlib.import_module loads: the command's module)
    assert {"pyqcow.cli.main", "pyqcow.header"} <= imported
    # no setuptools import-hook finder (tools/_setup.sh installs with editable_mode=compat),
    # no runpy (the launcher runs -c, not -m), no dataclasses/inspect, no typing
    assert sorted(m for m in imported if m.startswith("__editable__")) == []
    assert loaded(imported, ("runpy", "pathlib", "urllib") + DATACLASSES + FAST_NEVER) == []


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_works_in_a_fresh_process(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pyqcow.cli.main", command, "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: pyqcow {command} ")
    assert proc.stderr == ""


def test_root_help_lists_every_subcommand() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyqcow.cli.main", "--help"],
                          capture_output=True, text=True, check=True)
    for command in SUBCOMMANDS:
        assert f"    {command} " in proc.stdout


# -- layout.py's compiled form ---------------------------------------------------------------
def test_compiled_layout_cache_is_current() -> None:
    """pyqcow/_layout_compiled.py matches the declarations (else: python -m pyqcow.layout)."""
    assert _layout_compiled.SOURCE == layout._declaration_source()  # the key layout checks
    assert _layout_compiled.SOURCE_CRC == layout.source_crc()
    assert _layout_compiled.COMPILED == layout.compile_all()
    # every fixed-size header structure has a compiled form
    for name in ("HeaderV2", "HeaderV3Tail", "ExtensionHeader", "BitmapsExtension",
                 "FeatureNameTable", "SnapshotEntryFixed", "BitmapDirectoryEntryFixed"):
        assert name in _layout_compiled.COMPILED


def test_a_stale_cache_is_not_used(monkeypatch) -> None:
    monkeypatch.setattr(_layout_compiled, "SOURCE", _layout_compiled.SOURCE + b"#")
    monkeypatch.setattr(_layout_compiled, "COMPILED", {"HeaderV2": (">L", ("magic",), {}, False)})
    assert layout._load_compiled() == layout.compile_all()


def _construct_parse(decl, data: bytes):
    result = decl.construct.parse(data)
    if isinstance(result, cs.Container):
        return {k: v for k, v in result.items() if not k.startswith("_")}
    if isinstance(result, list):
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in result]
    return result


@pytest.mark.parametrize("name", sorted(_layout_compiled.COMPILED))
@given(data=st.data())
def test_compiled_parse_and_build_agree_with_construct(name: str, data) -> None:
    decl = getattr(layout, name)
    size = decl._struct.size
    if decl._repeat:
        size *= data.draw(st.integers(0, 4))
    raw = data.draw(st.binary(min_size=size, max_size=size + 3))
    if decl._repeat:
        raw = raw[:size]
    try:
        expected = _construct_parse(decl, raw)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            layout.parse(decl, raw)
        return
    assert layout.parse(decl, raw) == expected
    assert layout.build(decl, expected) == decl.construct.build(expected)


@pytest.mark.parametrize("name", ["HeaderV2", "ExtensionHeader", "SnapshotEntryFixed"])
def test_compiled_path_raises_constructs_errors(name: str) -> None:
    decl = getattr(layout, name)
    with pytest.raises(cs.StreamError):
        layout.parse(decl, bytes(decl._struct.size - 1))
    with pytest.raises(KeyError):  # construct's own error for a missing field
        layout.build(decl, {})
    with pytest.raises(cs.ConstructError):
        layout.build(decl, dict.fromkeys(decl._fields, -1))


def test_feature_name_too_long_is_refused_as_construct_does() -> None:
    entry = {"type": 0, "bit": 0, "name": "x" * 47}
    with pytest.raises(cs.ConstructError):
        layout.build(layout.FeatureNameTable, [entry])
    assert layout.build(layout.FeatureNameTable, [{**entry, "name": "x" * 46}]) == b"\0\0" + b"x" * 46


# -- header.py's records (no dataclasses on the start-up path) ------------------------------
def test_header_records_behave_as_the_frozen_dataclasses_they_replace() -> None:
    from pyqcow import spec
    from pyqcow.header import BitmapsExt, Extension, FeatureName, Header

    ext = Extension(spec.ExtType.BACKING_FORMAT, b"raw")
    assert ext == Extension(type=spec.ExtType.BACKING_FORMAT, data=b"raw")
    assert ext != Extension(spec.ExtType.BACKING_FORMAT, b"qcow2")
    assert hash(ext) == hash(Extension(spec.ExtType.BACKING_FORMAT, b"raw"))
    assert repr(FeatureName(0, 1, "corrupt bit")) == "FeatureName(type=0, bit=1, name='corrupt bit')"
    assert BitmapsExt(1, 2, 3) != (1, 2, 3)  # a record, not a tuple
    with pytest.raises(AttributeError):
        ext.data = b"qcow2"
    with pytest.raises(TypeError, match="missing"):
        Extension(1)
    with pytest.raises(TypeError, match="unexpected"):
        Extension(1, b"", colour=1)
    with pytest.raises(TypeError, match="multiple"):
        Extension(1, type=2)
    h = Header(3, 0, 0, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0)
    assert (h.refcount_order, h.header_length, h.extensions, h.backing_file) == (4, 72, (), None)
    h2 = h.replace(size=2 << 20, extensions=(ext,))
    assert (h.size, h2.size, h2.backing_format, h2.cluster_bits) == (1 << 20, 2 << 20, "raw", 16)
    assert h2 == Header(**{**{f: getattr(h, f) for f in Header._fields},
                           "size": 2 << 20, "extensions": (ext,)})
    assert not hasattr(h, "__dict__")  # slots, as cheap as the dataclass


# -- argparse's messages: untranslated only when no catalogue exists --------------------------
_MO_PROBE = r"""
import gettext, struct, sys
from pyqcow.cli.main import main
def mo(pairs):  # a GNU message catalogue
    pairs = sorted((k.encode(), v.encode()) for k, v in pairs.items())
    n, data, orig, trans = len(pairs), b"", [], []
    base = 28 + 16 * n
    for k, v in pairs:
        orig.append((len(k), base + len(data))); data += k + b"\0"
    for k, v in pairs:
        trans.append((len(v), base + len(data))); data += v + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    return head + b"".join(struct.pack("<2I", *e) for e in orig + trans) + data
d = sys.argv[1] + "/xx/LC_MESSAGES"
import os; os.makedirs(d)
with open(d + "/messages.mo", "wb") as f:
    f.write(mo({"": "Content-Type: text/plain; charset=UTF-8\n",
                "the following arguments are required: %s": "IL MANQUE %s"}))
gettext.bindtextdomain("messages", sys.argv[1])
main(["map"])
"""


def test_argparse_messages_are_still_translated_when_a_catalogue_exists(tmp_path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "LC_"))},
           "LANGUAGE": "xx", "LANG": "xx"}
    proc = subprocess.run([sys.executable, "-c", _MO_PROBE, str(tmp_path / "locale")],
                          capture_output=True, text=True, env=env)
    assert proc.stderr.endswith("pyqcow map: error: IL MANQUE IMAGE\n"), proc.stderr
    proc = subprocess.run([sys.executable, "-c", "from pyqcow.cli.main import main; main(['map'])"],
                          capture_output=True, text=True, env={**env, "LANGUAGE": "C"})
    assert proc.stderr.endswith("pyqcow map: error: the following arguments are required: "
                                "IMAGE\n"), proc.stderr


def test_entries_nonzero_per_byte_table_counts_every_subbyte_field() -> None:
    from pyqcow import entries

    for order in range(3):
        width = 1 << order
        mask = (1 << width) - 1
        assert entries._NONZERO_PER_BYTE[order] == bytes(
            sum(1 for i in range(8 // width) if (b >> (i * width)) & mask) for b in range(256)
        )


def test_format_size_unit_choice_is_frexps_without_the_math_module() -> None:
    """units.format_size picks the unit from the bit length of value/(1000/1024), which
    must be what qemu's frexp gives (the exponent; i = 0 for a quotient below 1)."""
    import math

    from pyqcow.units import format_size

    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    values = {1, 2, 3, 511, 512, 999, 1000, 1001, 1023, 1024, 1025, 65536, 67108864, 1 << 63}
    for k in range(1, 7):
        for base in (1 << (10 * k), 1000 << (10 * (k - 1)), 1000 * (1 << (10 * k)) // 1024):
            values |= {base - 1, base, base + 1}
    for n in range(64):
        values |= {(1 << n) - 1, 1 << n, (1 << n) + 1}
    for value in sorted(v for v in values if v > 0):
        exp = math.frexp(value / (1000.0 / 1024.0))[1]
        i = min(max(0, (exp - 1) // 10), len(suffixes) - 1)
        assert format_size(value).endswith(f" {suffixes[i]}B"), value


def test_the_writer_is_made_on_first_use_without_a_class_getattr(chain) -> None:
    """A read-only image never makes its writer; the first write does, once.  And
    no ``__getattr__`` on the image class: CPython then sends every attribute
    lookup of an image (the read path's too) through a slower hook, which made
    merge --dry-run of the 4 TiB scale chain ~10% slower when the lazy writer was
    first written that way."""
    from pyqcow.image import QcowImage

    assert not hasattr(QcowImage, "__getattr__")
    with QcowImage(str(chain / "top.qcow2")) as img:
        img.read(0, 4096)
        assert "writer" not in vars(img)
    with QcowImage(str(chain / "ov.qcow2"), "r+") as img:
        assert "writer" not in vars(img)
        img.write(0, b"x" * 512)
        writer = img.writer
        assert vars(img)["writer"] is writer and img.writer is writer
    assert QcowImage(str(chain / "ov.qcow2")).read(0, 1) == b"x"


def test_threads_that_first_use_the_writer_together_get_one_writer(chain, monkeypatch) -> None:
    """Two threads asking for a new image's writer at once both get the one that
    stays (the writer holds the allocation state: two would hand out one cluster
    twice)."""
    import threading

    from pyqcow import writer as writer_mod
    from pyqcow.image import QcowImage

    both = threading.Barrier(2)
    real = writer_mod.Writer.__init__

    def slow_init(self, img):
        real(self, img)
        both.wait(5)  # each thread has made its own before either is kept

    monkeypatch.setattr(writer_mod.Writer, "__init__", slow_init)
    with QcowImage(str(chain / "ov.qcow2"), "r+") as img:
        got = []
        threads = [threading.Thread(target=lambda: got.append(img.writer)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(got) == 2 and got[0] is got[1] is img.writer
