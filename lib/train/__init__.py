"""Stages 03 and 04: the one training loop (loop), checkpoints, metrics, and the phases that call it (pretrain, sft)."""
