"""Which models the engine serves, and which earlier positions each of their layers attends to.

The engine hands a model its own 4D attention mask (runner.py), and transformers
passes a 4D mask through unchanged: the mask is the whole truth about what a
query sees. A layer with a sliding window (Mistral's ``sliding_window``, Qwen2's
``use_sliding_window``, Gemma 2's alternate layers) sees only the last
``window`` positions, so its mask must say so, or every answer whose prompt
and output pass the window differs from transformers' ``generate``.

The layout comes from the same helper transformers' own cache uses to size its
sliding layers (``get_layer_types_and_kwargs``): a layer type per layer and the
window of each sliding one. Where the layers differ (Qwen2 above
``max_window_layers``, Gemma 2), the model gets one mask per layer type as a
dict, which these models' forward takes in place of building its own.

Served: the classes in :data:`SUPPORTED`, each checked against ``generate``
alone, batched, from the prefix cache and across windows shorter than the
prompt (tests/engine/test_architectures.py). Anything else is refused when the
engine is built, with a message that says why: a model that answers wrong with
a 200 is worse than one that does not start.
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model source could not be resolved or loaded, or the engine cannot serve it; the message says why."""


FULL, SLIDING = "full_attention", "sliding_attention"

# Model class -> whether its forward takes a dict of masks by layer type (so its layers may differ).
# Each entry is tested in tests/engine/test_architectures.py; add a class only with its test.
SUPPORTED: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,    # one window for every layer (config.sliding_window), or none
    "MixtralForCausalLM": False,
    "Qwen2ForCausalLM": True,       # windows on the layers from max_window_layers up, with use_sliding_window
    "Qwen2MoeForCausalLM": True,
    "Qwen3ForCausalLM": True,
    "Gemma2ForCausalLM": True,      # sliding and full layers alternate
    "Gemma3ForCausalLM": True,
    "Phi3ForCausalLM": False,       # Phi-3 and Phi-4: one window for every layer, or none
    "Starcoder2ForCausalLM": False,
    "SmolLM3ForCausalLM": True,
    "GemmaForCausalLM": False,
    "PhiForCausalLM": False,
    "GPT2LMHeadModel": False,
    "GPTNeoXForCausalLM": False,
    "OlmoForCausalLM": False,
    "Olmo2ForCausalLM": False,
    "GraniteForCausalLM": False,
    "StableLmForCausalLM": False,
}


def attention_windows(model) -> dict[str, int | None]:
    """The window of each layer type ``model`` has (None: every earlier position), or ModelLoadError."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    name = type(model).__name__
    if name not in SUPPORTED:
        raise ModelLoadError(
            f"the engine does not serve {name}: its answers have not been checked against transformers' generate. "
            f"Served: {', '.join(sorted(SUPPORTED))} (docs/architecture.md)")
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError(f"{name} with use_bidirectional_attention is not a causal model the engine serves")
    types, kwargs = get_layer_types_and_kwargs(config)
    windows: dict[str, int | None] = {}
    for kind, layer_kwargs in zip(types, kwargs):
        window = layer_kwargs.get("sliding_window")
        if kind == SLIDING and isinstance(window, int) and window > 0:
            windows[kind] = window
        elif kind == FULL:
            windows[kind] = None
        else:
            raise ModelLoadError(f"{name} has {kind!r} layers (window {window!r}); the engine serves layers "
                                 "that attend to every earlier position or to a sliding window of them")
    if len(windows) > 1 and not SUPPORTED[name]:
        raise ModelLoadError(f"{name} has layers of several attention types ({', '.join(sorted(windows))}) "
                             "but takes one mask for all of them")
    return windows
