"""GGML block formats dequantised with torch tensor ops: the same float32 bits as ``gguf.quants.dequantize``.

Pure: bytes in (a 1-D uint8 tensor of whole blocks), float32 out; no I/O, no gguf import. Each type follows gguf-py's
``quants.py`` (0.19) step for step where a step rounds: a float16 scale is widened to float32, every product and sum
is one float32 operation in the same order (``d * q``, ``(d * q) + m``, ``(d * sc) * q - dmin * m``), so each value
is rounded exactly as numpy rounds it. What is integer arithmetic there (nibbles, high bits, the offsets 8, 16, 32)
is computed here in any order that gives the same integers, and those integers are exact in float32. torch runs each
op on its own (eager mode fuses nothing, so no fused multiply-add creeps in).

Blocks are processed in chunks of about ``CHUNK_VALUES`` outputs (a chunk's temporaries stay in the core's cache and
memory stays bounded whatever the tensor's size), side by side on ``threads()`` threads: torch releases the GIL in
its kernels, and the scan runs torch single-threaded (``scanner.pipeline``), so the parallelism comes from here.

    dequantize(raw, "Q4_K")          # raw: uint8, n_blocks * 144 bytes -> float32, n_blocks * 256 values
"""
from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

QK_K = 256
# GGML type name -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES
SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
         "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}
CHUNK_VALUES = 1 << 19     # outputs per chunk: 2 MB of float32
HUGE_MIN_BYTES = 4 << 20  # outputs this large are mapped with huge pages (empty_float32)
MAX_THREADS = 4            # beyond this memory bandwidth, not cores, sets the pace (as scanner.pipeline)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def supported(qtype: str) -> bool:
    """Whether ``qtype`` (a GGML type name) is dequantised here."""
    return qtype in SIZES


def threads() -> int:
    """Threads that dequantise one tensor's chunks: one per core, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(threads(), thread_name_prefix="mmdetect-dequant")
        return _pool


def empty_float32(count: int) -> torch.Tensor:
    """An uninitialised float32 tensor of ``count`` values. Large ones (Linux) are anonymous mappings with
    MADV_HUGEPAGE: writing a fresh 64 MB buffer then faults in 32 pages instead of 16,384 (docs/performance.md has
    the time it saves)."""
    nbytes = 4 * count
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(count, dtype=torch.float32)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    return torch.frombuffer(mm, dtype=torch.float32, count=count)  # the tensor keeps the mapping alive


def dequantize(raw: torch.Tensor, qtype: str, workers: int | None = None) -> torch.Tensor:
    """``raw`` (1-D uint8, whole blocks of ``qtype``) as a 1-D float32 tensor, on ``workers`` threads (default
    ``threads()``). Raises ValueError for a type not in SIZES or bytes that are not whole blocks."""
    if qtype not in SIZES:
        raise ValueError(f"no torch dequantiser for {qtype}")
    block, size = SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % size:
        raise ValueError(f"{qtype} bytes must be a 1-D uint8 tensor of whole {size}-byte blocks")
    n_blocks = raw.numel() // size
    out = empty_float32(n_blocks * block)
    if n_blocks == 0:
        return out
    kernel = KERNELS[qtype]
    blocks, values = raw.view(n_blocks, size), out.view(n_blocks, block)
    step = max(1, CHUNK_VALUES // block)
    spans = [(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]
    workers = max(1, min(workers or threads(), len(spans)))
    if workers == 1:
        for a, b in spans:
            kernel(blocks[a:b], values[a:b])
        return out
    # contiguous runs of chunks per task: fewer handoffs, and each thread walks its part of the bytes in order
    per = -(-len(spans) // workers)
    runs = [spans[k:k + per] for k in range(0, len(spans), per)]

    def work(run: list[tuple[int, int]]) -> None:
        for a, b in run:
            kernel(blocks[a:b], values[a:b])

    pool = _executor()
    for future in [pool.submit(work, run) for run in runs]:
        future.result()
    return out


# --- the kernels: blocks (n, bytes per block) uint8 -> out (n, values per block) float32, written in place ---------
# torch's elementwise kernels are fast on contiguous tensors (docs/performance.md), much slower on views whose rows
# are 16 or 32 bytes long, each call costs several microseconds, and fresh memory costs page faults. So a kernel cuts
# nibbles and bit planes from 64-bit words (eight bytes per element) straight into per-thread scratch buffers in their
# final order (``_planes``), widens them to float32 in one contiguous copy, then scales and shifts in place.

M1, M2, M4 = 0x0101010101010101, 0x0303030303030303, 0x0F0F0F0F0F0F0F0F
_local = threading.local()


def _scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A buffer of this thread's, reused from chunk to chunk (its size bounded by the chunk's)."""
    bufs: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("bufs", {})
    count = 1
    for n in shape:
        count *= n
    buf = bufs.get((tag, dtype))
    if buf is None or buf.numel() < count:
        buf = bufs[(tag, dtype)] = torch.empty(count, dtype=dtype)
    return buf[:count].view(shape)


def _viewed(b: torch.Tensor, begin: int, end: int, dtype: torch.dtype, tag: str) -> torch.Tensor:
    """Bytes [begin, end) of each block as ``dtype`` elements (n, k): a view where the blocks keep them aligned,
    else a copy into scratch."""
    size = torch.empty((), dtype=dtype).element_size()
    if b.shape[1] % size == 0 and begin % size == 0 and end % size == 0:
        try:
            return b.view(dtype)[:, begin // size:end // size]
        except RuntimeError:  # the tensor's start is not aligned to the element
            pass
    buf = _scratch(tag, (b.shape[0], end - begin), torch.uint8)
    buf.copy_(b[:, begin:end])
    return buf.view(dtype)


def half_to_float(h: torch.Tensor) -> torch.Tensor:
    """float16 (any shape) widened to float32 as numpy widens it, NaNs included: torch's conversion is exact for
    every other value, but it quiets signalling NaNs (the vector path) or writes 0x7fffffff (the scalar path), where
    numpy keeps sign and payload (sign, exponent 0xff, the 10 payload bits shifted up by 13)."""
    f = h.to(torch.float32)
    nan = torch.isnan(f)
    if not bool(nan.any()):
        return f
    bits = h.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    exact = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return torch.where(nan, exact.view(torch.float32).view(f.shape), f)


def _halves(b: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """``count`` float16 values from byte ``at`` of each block, widened to float32: (n, count)."""
    return half_to_float(_viewed(b, at, at + 2 * count, torch.float16, "halves"))


def _planes(words: torch.Tensor, runs: int, mask: int, shifts: range, tag: str) -> torch.Tensor:
    """Bit fields of a block field given as 64-bit words (n, k): the field is ``runs`` runs of bytes, and for each run
    in turn, ``(byte >> s) & mask`` over the run for each s in ``shifts``. (n, runs * len(shifts) * 8k / runs) uint8,
    in that order, in a scratch buffer."""
    n, k = words.shape
    src = words.view(n, runs, k // runs)
    out = _scratch(tag, (n, runs, len(shifts), k // runs), torch.int64)
    for j, s in enumerate(shifts):
        if s == 0:
            torch.bitwise_and(src, mask, out=out[:, :, j])
        else:
            torch.bitwise_right_shift(src, s, out=out[:, :, j])
            out[:, :, j].bitwise_and_(mask)
    return out.view(torch.uint8).view(n, -1)


def _or_shifted(low: torch.Tensor, high: torch.Tensor, shift: int) -> torch.Tensor:
    """``low | (high << shift)`` bytewise, in low's buffer (no byte overflows into the next)."""
    w = high.view(torch.int64)
    w.bitwise_left_shift_(shift)
    return low.view(torch.int64).bitwise_or_(w).view(torch.uint8).view(low.shape)


def _scale_shift(o: torch.Tensor, d: torch.Tensor, m: torch.Tensor, add: bool) -> None:
    """``o <- (o * d) + m`` (``add``) or ``o * d - m`` in place, two roundings as numpy does them (o holds exact
    integers, d and m broadcast over it).

    When both terms are NaN, numpy's loops return the first one's (quiet) NaN, and torch's the second one's: those
    chunks (only crafted or broken scales: d not finite and m NaN) are redone with the first term kept."""
    both = not bool(torch.isfinite(d).all()) and bool((~torch.isfinite(d) & torch.isnan(m)).any())
    first = o * d if both else None
    o.mul_(d)
    o.add_(m) if add else o.sub_(m)
    if first is not None:
        o.copy_(torch.where(torch.isnan(first), first, o))


def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float32).view(out.shape))


def _f16_plain(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(half_to_float(b.contiguous().view(torch.float16)).view(out.shape))


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    # (int16 -> int32) << 16, viewed as float32, as gguf-py does: no rounding, NaN payloads kept
    wide = out.view(torch.int32)
    wide.copy_(b.contiguous().view(torch.int16).view(out.shape))
    wide.bitwise_left_shift_(16)


_BYTE_BITS: torch.Tensor | None = None


def _byte_bits(b: torch.Tensor, tag: str) -> torch.Tensor:
    """The bits of each byte of b (n, k) as 0/1 bytes, lowest first: (n, 8k) uint8, bit i of the little-endian
    k-byte word at position i (a table of the 256 bytes' bits as 64-bit words, gathered)."""
    global _BYTE_BITS
    if _BYTE_BITS is None:
        values = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        _BYTE_BITS = ((values >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).view(256)
    n, k = b.shape
    index = _scratch(tag + "-index", (n, k), torch.int64)
    index.copy_(b)
    out = _scratch(tag, (n * k,), torch.int64)
    torch.index_select(_BYTE_BITS, 0, index.view(-1), out=out)
    return out.view(torch.uint8).view(n, 8 * k)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _halves(b, 0, 1)
    q = _planes(_viewed(b, 2, 18, torch.int64, "qs"), 1, M4, range(0, 8, 4), "q")
    out.copy_(q.view(torch.int8).sub_(8))
    out.mul_(d)                                           # d * (q - 8)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = _halves(b, 0, 2)
    out.copy_(_planes(_viewed(b, 4, 20, torch.int64, "qs"), 1, M4, range(0, 8, 4), "q"))
    _scale_shift(out, dm[:, :1], dm[:, 1:], add=True)     # (d * q) + m


def _q5(b: torch.Tensor, at: int) -> torch.Tensor:
    """Q5_0/Q5_1 quants (n, 32) uint8 0..31: value i has its low 4 bits from the nibbles and bit 4 from bit i of the
    little-endian u32 at ``at``."""
    q = _planes(_viewed(b, at + 4, at + 20, torch.int64, "qs"), 1, M4, range(0, 8, 4), "q")
    return _or_shifted(q, _byte_bits(b[:, at:at + 4], "qh"), 4)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _halves(b, 0, 1)
    out.copy_(_q5(b, 2).view(torch.int8).sub_(16))
    out.mul_(d)                                           # d * (q - 16)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = _halves(b, 0, 2)
    out.copy_(_q5(b, 4))
    _scale_shift(out, dm[:, :1], dm[:, 1:], add=True)     # (d * q) + m


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _halves(b, 0, 1)
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(d)                                           # x * d


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16]
    dm = _halves(b, 80, 2)
    dl = dm[:, :1] * (scales & 0x0F).to(torch.float32)    # (n, 16)
    ml = dm[:, 1:] * (scales >> 4).to(torch.float32)
    q = _planes(_viewed(b, 16, 80, torch.int64, "qs"), 2, M2, range(0, 8, 2), "q")   # run g, shift s, byte j
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    _scale_shift(o, dl.unsqueeze(-1), ml.unsqueeze(-1), add=False)   # dl * q - ml


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, 96:108]
    d = _halves(b, 108, 1)
    low = torch.cat([scales[:, :8] & 0x0F, scales[:, :8] >> 4], dim=1)
    high = torch.cat([(scales[:, 8:12] >> s) & 3 for s in range(0, 8, 2)], dim=1)
    sc = (low | (high << 4)).view(torch.int8) - 32        # the 6-bit scales, signed
    dl = d * sc.to(torch.float32)                         # (n, 16)
    ql = _planes(_viewed(b, 32, 96, torch.int64, "qs"), 2, M2, range(0, 8, 2), "q")
    qh = _planes(_viewed(b, 0, 32, torch.int64, "hmask"), 1, M1, range(8), "qh")   # plane k, byte j: 32k + j
    q = _or_shifted(ql, qh, 2).view(torch.int8).sub_(4)   # ql - 4 * (1 - bit)
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    o.mul_(dl.unsqueeze(-1))                              # dl * q


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K per sub-block (n, 8, 1): d * scale and dmin * min, the eight 6-bit scales and mins cut from their 12
    bytes as three little-endian 32-bit words (d, m, md: bytes 0-3, 4-7, 8-11), four 6-bit fields per word."""
    n = b.shape[0]
    dm = _halves(b, 0, 2)
    words = _viewed(b, 4, 16, torch.int32, "scales")
    d, m, md = words[:, 0], words[:, 1], words[:, 2]
    sm = _scratch("sm", (n, 4), torch.int32)
    torch.bitwise_and(d, 0x3F3F3F3F, out=sm[:, 0])                                   # sc 0-3
    torch.bitwise_or(md & 0x0F0F0F0F, (d >> 2) & 0x30303030, out=sm[:, 1])           # sc 4-7
    torch.bitwise_and(m, 0x3F3F3F3F, out=sm[:, 2])                                   # min 0-3
    torch.bitwise_or((md >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=sm[:, 3])    # min 4-7
    scaled = dm.unsqueeze(-1) * sm.view(torch.uint8).view(n, 2, 8).to(torch.float32)  # d * sc, dmin * min
    return scaled[:, 0].unsqueeze(-1), scaled[:, 1].unsqueeze(-1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    o = out.view(n, 8, 32)
    o.copy_(_planes(_viewed(b, 16, 144, torch.int64, "qs"), 4, M4, range(0, 8, 4), "q").view(n, 8, 32))
    _scale_shift(o, dl, ml, add=False)                    # d * q - dm


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    ql = _planes(_viewed(b, 48, 176, torch.int64, "qs"), 4, M4, range(0, 8, 4), "q")
    qh = _planes(_viewed(b, 16, 48, torch.int64, "qhs"), 1, M1, range(8), "qh")
    o = out.view(n, 8, 32)
    o.copy_(_or_shifted(ql, qh, 4).view(n, 8, 32))
    _scale_shift(o, dl, ml, add=False)                    # d * q - dm


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (_halves(b, 208, 1) * scales).unsqueeze(-1)      # (n, 16, 1)
    ql = _planes(_viewed(b, 0, 128, torch.int64, "qs"), 2, M4, range(0, 8, 4), "q")     # run g, half h, byte j
    qh = _planes(_viewed(b, 128, 192, torch.int64, "qhs"), 2, M2, range(0, 8, 2), "qh")
    q = _or_shifted(ql, qh, 4).view(torch.int8).sub_(32)
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    o.mul_(d)                                             # d * q


KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "F32": _f32, "F16": _f16_plain, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
