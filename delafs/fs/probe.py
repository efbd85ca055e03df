"""What is already on a device: the check that keeps ``delafs mkfs`` and
``delafs mount -o mkfs`` from formatting over a filesystem (libblkid's
probe, the few signatures a refusal needs, then blkid itself if present)."""

from __future__ import annotations

import shutil
import subprocess

from ..ondisk import SB_MAGIC

_MAGICS = [  # (offset, bytes, name): enough to refuse the usual suspects without blkid
    (1080, b"\x53\xef", "ext2/3/4"),
    (0, b"XFSB", "xfs"),
    (65600, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"hsqs", "squashfs"),
    (32769, b"CD001", "iso9660"),
    (512, b"EFI PART", "a GPT partition table"),
    (3, b"NTFS    ", "ntfs"),
    (82, b"FAT32   ", "vfat"),
    (54, b"FAT1", "vfat"),
]


def existing_signature(path: str, dev) -> str | None:
    """Name of a filesystem (or other signature) already on the device,
    None if it looks blank (``dev``: the open device, read with
    read_sync).  A delafs whose primary superblock is gone still counts:
    it mounts from the secondary one."""
    head = dev.read_sync(0, min(dev.nblocks, 17))
    if head[:8] == SB_MAGIC:
        return "delafs"
    if dev.nblocks and dev.read_sync(dev.nblocks - 1, 1)[:8] == SB_MAGIC:
        return "delafs (secondary superblock)"
    for off, magic, name in _MAGICS:
        if head[off:off + len(magic)] == magic:
            return name
    if shutil.which("blkid"):
        r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", path],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return None
