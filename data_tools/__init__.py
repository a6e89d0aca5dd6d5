"""Bytes on disk -> samples in memory: shard builders, manifest, verification, synthetic scenes and
the streaming loader with exact resume (DESIGN.md sections 3 and 4)."""
