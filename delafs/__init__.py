"""delafs: a FUSE filesystem built around a running model of the Linux iomap
delayed-allocation buffered-write engine.

Layers, top calls down (see docs/design.md):

    vfs (pyfuse3 adapter)  ->  iomap engine  ->  page cache
        ->  filesystem (fs.py: inodes, directories, extents, allocator)
        ->  log (journal)  ->  blockdev (the image)
"""

__version__ = "0.1.0"
