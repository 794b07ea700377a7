"""CRC-32C (Castagnoli): the checksum of every stored block and of every exported tensor.

The `crc32c` package computes it in hardware (SSE 4.2 / ARMv8), reads any buffer without a
copy and releases the GIL: about 14 GB/s here, against 0.75 GB/s for sha256. `combine`
joins the checksums of consecutive pieces (zlib's crc32_combine, for this polynomial), so a
tensor's checksum comes from its blocks' checksums without reading the tensor again.
"""

from __future__ import annotations

from typing import Any

import crc32c as _crc32c

_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reflected


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of a buffer (bytes, memoryview, numpy array), continuing from `value`."""
    return _crc32c.crc32c(data, value)


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the polynomial (reflected bit order: x^0 is the top bit)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    out = [1 << 30]  # x^1
    for _ in range(31):
        out.append(_multmodp(out[-1], out[-1]))  # x^(2^k)
    return out


_X2N = _powers()


def _x8nmodp(n: int) -> int:
    """x^(8 n) modulo the polynomial: the shift that n bytes appended apply to a CRC."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of A + B from crc(A), crc(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2 if len2 else crc1


def hex32(value: int) -> str:
    return f"{value:08x}"
