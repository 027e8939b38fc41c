"""What `mae pretrain --online-probe` costs: the pre-training step (forward, backward, AdamW)
with and without the probe's step on its detached features (BatchNorm + linear head, its own
AdamW), same model, batch and sizes as test_training_step.py's kernels case. The issue's bound:
under 5% of a step."""
from __future__ import annotations

import pytest
import torch

from mae.models.image import MAE, config_of
from mae.train.online_probe import OnlineProbe

from .test_training_step import CONFIGS, DEVICE, MODELS, _measure

pytestmark = pytest.mark.step
CLASSES = 1000 if DEVICE == "cuda" else 10  # ImageNet's head on a GPU, the built-in set's else


@pytest.mark.parametrize("probe", [False, True], ids=["mae", "mae+online_probe"])
@pytest.mark.parametrize("name", MODELS)
def test_pretrain_step_with_online_probe(benchmark, name, probe):
    batch, overrides = CONFIGS[name]
    model = MAE(config_of(name, **overrides))
    benchmark.group = f"pretrain step {name} with online probe"  # report.py: a step table
    benchmark.extra_info.update(model=name, variant="mae+online_probe" if probe else "mae")
    if not probe:
        _measure(benchmark, model, lambda m, x: m(x).loss, batch, model.config["img_size"],
                 False)
        return
    model = model.to(DEVICE)
    online = OnlineProbe(model, CLASSES, torch.device(DEVICE))
    labels = torch.randint(0, CLASSES, (batch,), device=DEVICE)

    def forward(m, x):
        loss = m(x).loss
        online.step(labels)
        return loss

    _measure(benchmark, model, forward, batch, model.config["img_size"], False)
    assert online.steps > 0  # the probe ran in the measured step
