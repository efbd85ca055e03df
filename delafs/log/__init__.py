"""Metadata logging (layer 5): the write-ahead journal of checksummed
transactions, its recovery at mount, and the metadata buffer cache whose
dirty blocks each commit logs (xfs_log/xfs_trans_buf in spirit).

    journal     Journal: transactions, checkpoints, log scan and replay
    metabuf     MetaStore: cached metadata blocks, dirty tracking, commit
"""

from .journal import Journal, log_blocks_needed
from .metabuf import MetaStore

__all__ = ["Journal", "MetaStore", "log_blocks_needed"]
