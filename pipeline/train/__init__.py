"""Distributed DINO training on Ray Train: the per-worker loop, the trainer, checkpoints, metrics."""
