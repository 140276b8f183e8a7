"""ChatStream: a streaming chat server for Hugging Face transformers models.

Heavy modules (torch, fastapi) load on first use, so that ``chatstream.envvars``
stays cheap to import for the operator.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "ChatStream": ".server.library",
    "ChatPrompt": ".prompt",
    "AbstractChatPrompt": ".prompt",
    "load_model": ".loader",
    "ModelLoadError": ".loader",
    "SamplingParams": ".engine.sampling",
    "Engine": ".engine.loop",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'chatstream' has no attribute {name!r}")
