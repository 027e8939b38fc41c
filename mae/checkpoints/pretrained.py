"""The model a `mae pretrain` checkpoint describes (its saved arguments), built and loaded
strictly: what `mae linprobe`, `visualize`, `anomaly` and `export` start from."""
from __future__ import annotations

from ..models import build_model
from ..models.image import MODEL_CONFIGS, model_config_of
from .files import CheckpointError, load_checkpoint, load_weights, weights_kind


def model_from_checkpoint(path, load_weights: bool = True, trust: bool = False):
    """(model, saved arguments) of a `mae pretrain` checkpoint; random weights if told so."""
    state = load_checkpoint(path, trust=trust)
    return model_of_state(state, path, load_weights), state["args"]


def check_saved_args(state: dict, path) -> None:
    """A pre-training checkpoint that saves its arguments must hold the weights they describe
    (official ones save none and pass as they are)."""
    saved = state.get("args")
    if weights_kind(state) == "pre-training" and isinstance(saved, dict) \
            and (saved.get("model_config") or saved.get("model")):
        model_of_state(state, path)


def model_of_state(state: dict, path, load: bool = True):
    """The model a loaded `mae pretrain` checkpoint's arguments describe, with its weights if
    `load`; a checkpoint of anything else, or arguments that do not describe its weights, is a
    CheckpointError saying what the file holds."""
    if weights_kind(state) == "fine-tuning":
        raise CheckpointError(f"checkpoint {path} holds fine-tuning weights (a classifier), not "
                              f"a pre-trained MAE: pass a `mae pretrain` checkpoint")
    saved = state.get("args")
    if not isinstance(saved, dict) or not (saved.get("model_config") or saved.get("model")):
        raise CheckpointError(f"checkpoint {path} does not say which model it holds (no saved "
                              f"`mae pretrain` arguments); official MAE checkpoints are for "
                              f"`mae finetune --finetune`")
    try:
        config = model_config_of(saved)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} names an unknown model {exc}; known: "
                              f"{sorted(MODEL_CONFIGS)}") from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its saved model config is not valid "
                              f"({exc})") from exc
    model = build_model(config)
    if load:
        load_weights(model, state, f"checkpoint {path}",
                     "the model its saved arguments describe (the file was altered, or its "
                     "arguments come from another run)")
    return model
