"""cli/output.py: qemu's QDict key order and JSON pretty-printing, map lines."""

from __future__ import annotations

from pyqcow.cli.output import map_human, map_json, qdict_order, qemu_json
from pyqcow.mapping import Extent

IMAGE_INFO_QAPI_ORDER = [
    "filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
    "encrypted", "compressed", "backing-filename", "full-backing-filename",
    "backing-filename-format", "snapshots", "backing-image", "format-specific",
]


def test_qdict_order_matches_qemu_img_info() -> None:
    # the key order qemu-img 7.2 info --output=json prints
    assert qdict_order(IMAGE_INFO_QAPI_ORDER) == [
        "backing-image", "compressed", "backing-filename-format", "snapshots", "virtual-size",
        "filename", "cluster-size", "format", "actual-size", "format-specific",
        "full-backing-filename", "encrypted", "backing-filename", "dirty-flag",
    ]
    assert qdict_order(["name", "granularity", "flags"]) == ["flags", "name", "granularity"]


def test_qemu_json_layout() -> None:
    text = qemu_json({"type": "qcow2", "data": {"flags": [], "list": [1, True], "s": 'a"\u00e9'}})
    # qemu prints an empty list as "[" newline "]", escapes non-ASCII as \\uXXXX
    assert text == (
        '{\n    "type": "qcow2",\n    "data": {\n        "flags": [\n        ],\n'
        '        "list": [\n            1,\n            true\n        ],\n'
        '        "s": "a\\"\\u00E9"\n    }\n}'
    )


def test_map_json_text() -> None:
    text = map_json([
        {"start": 0, "length": 512, "depth": 0, "present": True, "zero": False, "data": True,
         "offset": 4096},
        {"start": 512, "length": 512, "depth": 1, "present": False, "zero": True, "data": False},
    ])
    assert text == (
        '[{ "start": 0, "length": 512, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 4096},\n{ "start": 512, "length": 512, "depth": 1, '
        '"present": false, "zero": true, "data": false}]\n'
    )


def test_map_human_lists_data_only() -> None:
    text = map_human([
        Extent(0, 65536, 0, True, False, True, 0x50000, "a.qcow2"),
        Extent(65536, 65536, 0, True, True, False, None),
        Extent(131072, 65536, 0, True, False, True, 0, "a.qcow2"),
    ])
    assert text.splitlines() == [
        "Offset          Length          Mapped to       File",
        "0               0x10000         0x50000         a.qcow2",
        "0x20000         0x10000         0               a.qcow2",
    ]
