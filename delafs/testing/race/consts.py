"""Sizes and limits every part of the explorer shares."""

from ...lib.units import BLOCK_SIZE

BS = BLOCK_SIZE
INF = 1 << 62
IMAGE_SIZE = 8 << 20
DEFAULT_MAX_STEPS = 20000
# Byte slots inside every block (holetest style): buffered writers' small
# writes use [0, 512) and [1024, 1536), mmap stores [2048, 3072).
MMAP_SLOT = (2048, 3072)
