"""Header patches applied after an image is built (self-contained functions: their
source is also pasted into ``reproduce()`` scripts)."""

from __future__ import annotations


def add_unknown_extension(path, ext_type, payload):
    """Insert a header extension of an unknown ``ext_type`` before the end marker
    (QEMU ignores unknown extensions).  Returns False when cluster 0 has no room."""
    import struct

    with open(path, "r+b") as f:
        head = bytearray(f.read(72))
        version = struct.unpack_from(">I", head, 4)[0]
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        cs = 1 << cluster_bits
        f.seek(0)
        c0 = bytearray(f.read(cs))
        hlen = struct.unpack_from(">I", c0, 100)[0] if version >= 3 else 72
        bf_off, bf_len = struct.unpack_from(">QI", c0, 8)
        pos = hlen
        while pos + 8 <= cs:
            t, n = struct.unpack_from(">II", c0, pos)
            if t == 0:
                break
            pos += 8 + ((n + 7) & ~7)
        else:
            return False
        ext = struct.pack(">II", ext_type, len(payload)) + payload
        ext += bytes(-len(ext) % 8)
        used_end = max(pos + 8, bf_off + bf_len if bf_off else 0)
        if used_end + len(ext) > cs:
            return False
        c0[pos:pos] = ext
        del c0[cs:]
        if bf_off:
            struct.pack_into(">Q", c0, 8, bf_off + len(ext))
        f.seek(0)
        f.write(c0)
    return True


def set_incompatible_bits(path, bits):
    """OR ``bits`` into the v3 incompatible-features field (dirty = 1, corrupt = 2)."""
    import struct

    with open(path, "r+b") as f:
        f.seek(72)
        v = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", v | bits))
