"""The batching generation engine and model loading."""

from .events import Delta, Failed, Finished
from .loader import DEFAULT_MODEL, ModelLoadError, load_model, parse_source, prepare_builtin
from .loop import Engine
from .sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams

__all__ = ["Delta", "Failed", "Finished", "DEFAULT_MODEL", "ModelLoadError", "load_model", "parse_source",
           "prepare_builtin", "Engine", "SamplingParams", "MAX_STOP_STRINGS", "MAX_STOP_LENGTH"]
