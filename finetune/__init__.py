"""Retrieval finetuning (paper hard-negative recipe with IAIS), retrieval evaluation and ISDa reports.

Depends on `pretrain` (engine, checkpoints, metrics) and `data_tools`; adds objectives and batch kinds,
not a second training loop.
"""
