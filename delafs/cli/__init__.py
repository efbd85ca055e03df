"""The delafs command: mkfs, fsck, mount, umount, stat, inject, sync, race."""

from .app import main

__all__ = ["main"]
