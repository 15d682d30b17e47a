"""``show``: a domain's disks with their chains and sizes, and its snapshot
tree with each snapshot's merge costs (JSON-ready dict and human text)."""

from __future__ import annotations

import os

from ..chain import host_path, open_image
from ..errors import QcowError
from .connection import Domain, _conn


def show(conn_or_uri, domain_name: str) -> dict:
    """The snapshot tree, each disk's chain with sizes, and each snapshot's merge costs."""
    from ..ops.merge import plan_merge

    domain = Domain(_conn(conn_or_uri), domain_name)
    out: dict = {"domain": domain.name, "uuid": domain.dom.UUIDString(),
                 "active": domain.is_active(), "disks": [], "snapshots": []}
    for d in domain.disks():
        entry: dict = {"target": d.target, "type": d.type, "device": d.device,
                       "source": d.source, "format": d.format, "layers": []}
        if d.type == "file" and d.source and os.path.exists(d.source):
            try:
                with open_image(d.source, "r", format=d.format, force_share=True) as img:
                    for layer in img.chain:
                        st = os.stat(layer.path)
                        entry["layers"].append({
                            "file": host_path(layer.path), "format": layer.format,
                            "virtual_size": layer.virtual_size,
                            "allocated_bytes": st.st_blocks * 512,
                            "dirty_bytes": _own_bytes(layer),
                        })
            except QcowError as e:
                entry["error"] = str(e)
        out["disks"].append(entry)
    for s in domain.snapshots():
        snap = {"name": s.name, "parent": s.parent, "current": s.current,
                "creation_time": s.creation_time, "disks": []}
        for target, top in s.overlays.items():
            frozen = s.frozen.get(target, (None, None))[0]
            disk = {"disk": target, "overlay": top, "frozen": frozen}
            try:
                mp = plan_merge(top, keep="base")
                disk.update(commit_bytes=mp.commit_bytes, stream_bytes=mp.stream_bytes)
            except (QcowError, OSError) as e:
                disk["error"] = str(e)
            snap["disks"].append(disk)
        out["snapshots"].append(snap)
    return out


def _own_bytes(img) -> int:
    """Guest bytes this layer itself holds (what it changed over its backing)."""
    if img.format != "qcow2":
        return os.stat(img.path).st_blocks * 512
    from ..mapping import allocated_bytes

    return allocated_bytes(img)


def show_human(info: dict) -> str:
    lines = [f"domain {info['domain']} ({info['uuid']})"
             + (" [active]" if info["active"] else " [shut off]")]
    for d in info["disks"]:
        lines.append(f"  disk {d['target']} ({d['type']}, {d['device']}): {d['source']}")
        for i, layer in enumerate(d["layers"]):
            lines.append(f"    {'└─' if i else '  '} {layer['file']} ({layer['format']}, "
                         f"{layer['virtual_size']} bytes, allocated {layer['allocated_bytes']}, "
                         f"dirty {layer['dirty_bytes']})")
        if d.get("error"):
            lines.append(f"    error: {d['error']}")
    if info["snapshots"]:
        lines.append("  snapshots:")
        children: dict = {}
        for s in info["snapshots"]:
            children.setdefault(s["parent"], []).append(s)

        def walk(parent, depth):
            for s in children.get(parent, []):
                lines.append("    " + "  " * depth + f"{s['name']}"
                             + (" (current)" if s["current"] else ""))
                for d in s["disks"]:
                    cost = (f"merge copies commit {d['commit_bytes']} / stream "
                            f"{d['stream_bytes']} bytes" if "commit_bytes" in d
                            else d.get("error", ""))
                    lines.append("    " + "  " * depth + f"  {d['disk']}: {d['overlay']} over "
                                 f"{d['frozen']}; {cost}")
                walk(s["name"], depth + 1)

        walk(None, 0)
    return "\n".join(lines) + "\n"
