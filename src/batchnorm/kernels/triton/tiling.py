"""How the Triton kernels tile an (outer, C, inner) view and split it across programs.

Every data pass tiles the view into ``[BLOCK_O, BLOCK_C, BLOCK_I]`` blocks; the grid is
``(channel blocks, splits)``, each split owning a rectangle of (outer, inner) indices. Plain
Python (no triton import): the plan is testable anywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# elements per tile: 2048 with 8 warps keeps every data kernel under 80 registers a thread on
# sm_90 (4096 with 4 warps needed up to 254: low occupancy for memory-bound passes)
TILE = 2048
NUM_WARPS = 8  # per program of the data passes: 8 elements per thread and tile
# programs launched per data pass, about; a small number under the interpreter so that the tests
# exercise several splits per channel, several tiles per split and partial tiles
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 4


def np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """How one (outer, C, inner) shape is tiled and split across programs."""

    outer: int
    channels: int
    inner: int
    block_o: int
    block_c: int
    block_i: int
    o_per: int  # outer indices per split
    i_per: int  # inner indices per split
    split_o: int
    split_i: int

    @property
    def splits(self) -> int:
        return self.split_o * self.split_i

    @property
    def extent(self) -> tuple[int, int]:
        """(outer, inner): the kernels' OUTER and INNER arguments."""
        return self.outer, self.inner

    @property
    def count(self) -> float:
        """Values per channel."""
        return float(self.outer * self.inner)

    @property
    def grid(self) -> tuple[int, int]:
        return (cdiv(self.channels, self.block_c), self.splits)


def _block_inner(inner: int) -> int:
    """The largest power of two (128 to TILE) that pads ``inner`` by at most 5%, else the
    tightest; small ``inner`` take the next power of two."""
    if inner <= 128:
        return np2(inner)
    top = min(TILE, np2(inner))
    sizes = [b for b in (4096, 2048, 1024, 512, 256, 128) if b <= top] or [128]
    for b in sizes:
        if cdiv(inner, b) * b <= 1.05 * inner:
            return b
    return min(sizes, key=lambda b: cdiv(inner, b) * b)


def plan(outer: int, channels: int, inner: int, programs: int) -> Plan:
    """Tile sizes and splits for about ``programs`` programs per pass."""
    if inner > 1:  # NCHW-like: contiguous runs along inner, one channel per tile
        block_i = _block_inner(inner)
        block_c = 1
    else:  # channels-last or (N, C): contiguous runs along the channels
        block_i = 1
        block_c = min(np2(channels), 128)
    block_o = max(1, min(np2(outer), TILE // (block_i * block_c)))
    c_blocks = cdiv(channels, block_c)
    want = max(1, programs // c_blocks)
    o_blocks = cdiv(outer, block_o)
    i_blocks = cdiv(inner, block_i)
    split_o = max(1, min(want, o_blocks))
    split_i = max(1, min(want // split_o, i_blocks))
    o_per = cdiv(o_blocks, split_o) * block_o
    i_per = cdiv(i_blocks, split_i) * block_i
    split_o = cdiv(outer, o_per)  # no empty splits
    split_i = cdiv(inner, i_per)
    return Plan(outer, channels, inner, block_o, block_c, block_i, o_per, i_per, split_o, split_i)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def programs_for(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * PROGRAMS_PER_SM
    return INTERPRETER_PROGRAMS
