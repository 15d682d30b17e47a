"""Compressed clusters: read one and decompress it (deflate or zstd), bounded."""

from __future__ import annotations

import zlib

from . import entries, spec
from .errors import CorruptImageError, UnsupportedFeatureError


def read_compressed_cluster(img, entry: int) -> bytes:
    """Decompressed contents of the cluster that compressed L2 ``entry`` of
    ``img`` (a QcowImage) describes: exactly one cluster, or CorruptImageError."""
    host, nbytes = entries.decode_compressed(entry, img.cluster_bits)
    if host >= img.file_size or host == 0:
        raise CorruptImageError(
            img.path, f"compressed cluster at host offset {host:#x} lies beyond the end of the file"
        )
    raw = img.hf.pread(nbytes, host)
    cs = img.cluster_size
    try:
        if img.header.compression_type == spec.CompressionType.ZSTD:
            data = _zstd_decompress(raw, cs)
        else:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, cs)
    except Exception as e:
        raise CorruptImageError(
            img.path, f"compressed cluster at host offset {host:#x} cannot be decompressed: {e}"
        ) from e
    if len(data) < cs:
        raise CorruptImageError(
            img.path, f"compressed cluster at host offset {host:#x} is truncated"
        )
    if len(data) > cs:  # only zstd reads one byte past the cluster to tell
        raise CorruptImageError(
            img.path,
            f"compressed cluster at host offset {host:#x} decompresses to more than "
            f"one cluster ({cs} bytes)",
        )
    return data


#: Largest zstd window accepted (a frame header may ask for up to 2 GiB; qemu's
#: clusters are at most 2 MiB and its default level uses a window of 2 MiB at most).
ZSTD_MAX_WINDOW = 32 << 20


def _zstd_decompress(raw: bytes, cluster_size: int) -> bytes:
    """At most ``cluster_size + 1`` bytes of the first zstd frame in ``raw``.

    The output is bounded whatever the frame claims (a 16 KiB frame can expand to
    gigabytes); one byte more than a cluster tells the caller the frame is too long.
    """
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - zstandard is a dependency
        raise UnsupportedFeatureError(None, "zstd compression needs the zstandard package") from e
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    want = cluster_size + 1
    parts = []
    got = 0
    # read_to_iter yields the output in pieces of at most ``want`` bytes, lazily, and
    # stops at the end of the frame (the sector padding after it is never decoded)
    for chunk in dctx.read_to_iter(raw, write_size=want):
        parts.append(chunk)
        got += len(chunk)
        if got >= want:
            break
    return b"".join(parts)[:want]
