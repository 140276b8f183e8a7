"""The batching generation engine. It imports nothing of the service above it (model loading: loader.py)."""

from .architectures import ModelLoadError
from .events import Collector, Delta, Failed, Finished
from .loop import Engine
from .sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams

__all__ = ["Collector", "Delta", "Failed", "Finished", "ModelLoadError", "Engine", "SamplingParams", "MAX_STOP_STRINGS",
           "MAX_STOP_LENGTH"]
