"""Masked Autoencoder model, training and evaluation built on mae_kernels.

Rooms, each importing only from those listed before it: `models` (MAE, VideoMAE) and `data`
(Pillow, GPU and shard loaders); `checkpoints` (files, sharded, HF and timm formats); `eval`
(figures, reconstructions, anomaly maps); `train` (the engine, the pre-training, fine-tuning and
probing commands, distributed runs, FSDP2, preemption, logging, ablations); `cli`, the `mae`
command, on top."""
from .models import *  # noqa: F403 (the public model API, listed there)
from .models import __all__  # noqa: F401
