"""Primitives every layer uses and none owns: units, errors, the lock
primitives and their order, errortags (fault injection) and trace events.

Nothing here imports another delafs layer.
"""
