"""harness.memory.memtouch's host side in C (words, checksum, host_check) is the Python reference:
word(pattern, o) = ((pattern ^ o) * MIX) mod 2^64 and s = s * 31 + v mod 2^64, as
guests/payloads/memtouch.c computes them."""

from __future__ import annotations

import pytest

from harness.memory.memtouch import MASK, checksum, host_check, host_fill, offsets, word, words


def _ref_words(pattern: int, length: int, stride: int, base: int) -> list[int]:
    return [word(pattern, base + o) for o in offsets(length, stride)]


def _ref_checksum(values: list[int]) -> int:
    s = 0
    for v in values:
        s = (s * 31 + v) & MASK
    return s


@pytest.mark.parametrize(("pattern", "length", "stride", "base"), [
    (0, 4096, 8, 0), (0xDEADBEEF_CAFEF00D, 2 << 20, 512, 0), (MASK, 4096 + 5, 8, 0x1000),
    ((1 << 70) + 3, 64, 24, MASK - 8), (7, 7, 8, 0), (7, 0, 8, 0)])
def test_words_and_checksum_are_the_reference(pattern, length, stride, base):
    want = _ref_words(pattern, length, stride, base)
    got = words(pattern, length, stride, base)
    assert got.typecode == "Q" and list(got) == want
    assert checksum(got) == _ref_checksum(want) == checksum(want)  # the array path and the generic one


def test_host_check_finds_exactly_the_changed_words():
    buf = bytearray(1 << 16)
    host_fill(buf, 0x1234, 64)
    assert host_check(buf, 0x1234, 64) == (0, None)
    view = memoryview(buf).cast("Q")
    view[8 * 10] ^= 1  # word 10 at stride 64 (offset 640)
    view[8 * 99] = 0
    view[1] = 5  # between strided words: not visited
    assert host_check(buf, 0x1234, 64) == (2, 640)
    assert host_check(buf, 0x1235, 64)[0] == len(offsets(len(buf), 64))
