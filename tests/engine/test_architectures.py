"""Every architecture the engine serves answers as transformers' ``generate`` does; the others are refused.

Tiny random models of each family (two or four layers, hidden size 64), built here from transformers' own
config classes (no downloads), with the builtin tokenizer's vocabulary. The sliding windows (16 positions)
are shorter than the prompts (up to 50 tokens), so a window that the engine's masks left out changes the
greedy answer (it once did: Mistral, Qwen2 with ``use_sliding_window``, Gemma 2, Phi-3).
Compared with ``generate`` on an untouched copy of the weights: alone, four prompts of different lengths
batched over three rows (queueing, chunked prefill beside decoding rows, row moves), and second turns
started from the prefix cache with more cached tokens than the window.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from support.net import free_port

from chatstream.engine import Engine, Failed, Finished, ModelLoadError, SamplingParams
from chatstream.engine.architectures import FULL, SLIDING, SUPPORTED, attention_windows

WINDOW = 16
NEW_TOKENS = 10
PROMPT_LENGTHS = (50, 21, 37, 9)
W = {SLIDING: WINDOW}
F = {FULL: None}

# name: (config class, its arguments, the windows the engine must see)
FAMILIES = {
    "llama": ("LlamaConfig", {}, F),
    "mistral": ("MistralConfig", {"sliding_window": None}, F),
    "mistral-window": ("MistralConfig", {"sliding_window": WINDOW}, W),
    "mixtral-window": ("MixtralConfig", {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
                       W),
    "qwen2": ("Qwen2Config", {}, F),
    "qwen2-window-upper-layers": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                  "max_window_layers": 1}, {**F, **W}),
    "qwen2-window-every-layer": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                 "max_window_layers": 0}, W),
    "qwen2-moe-window": ("Qwen2MoeConfig", {"use_sliding_window": True, "sliding_window": WINDOW,
                                            "max_window_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
                         {**F, **W}),
    "qwen3-window": ("Qwen3Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                                     "head_dim": 16}, {**F, **W}),
    "gemma": ("GemmaConfig", {"head_dim": 16}, F),
    "gemma2-window": ("Gemma2Config", {"sliding_window": WINDOW, "head_dim": 16}, {**F, **W}),
    "gemma3-window": ("Gemma3TextConfig", {"sliding_window": WINDOW, "head_dim": 16,
                                           "layer_types": [SLIDING, FULL]}, {**F, **W}),
    "phi3": ("Phi3Config", {"sliding_window": None}, F),
    "phi3-window": ("Phi3Config", {"sliding_window": WINDOW}, W),
    "starcoder2-window": ("Starcoder2Config", {"sliding_window": WINDOW}, W),
    "smollm3-window": ("SmolLM3Config", {"use_sliding_window": True, "sliding_window": WINDOW,
                                         "num_hidden_layers": 4, "no_rope_layer_interval": 2}, {**F, **W}),
    "phi": ("PhiConfig", {"num_key_value_heads": 4}, F),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}, F),
    "gpt-neox": ("GPTNeoXConfig", {"num_key_value_heads": None}, F),
    "olmo": ("OlmoConfig", {}, F),
    "olmo2": ("Olmo2Config", {}, F),
    "granite": ("GraniteConfig", {}, F),
    "stablelm": ("StableLmConfig", {}, F),
}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def tok(model_and_tokenizer):
    return model_and_tokenizer[1]


def tiny(family: str, vocab: int, seed: int = 0):
    config_class, kwargs, _ = FAMILIES[family]
    small = {} if config_class == "GPT2Config" else SMALL
    config = getattr(transformers, config_class)(**{**small, "vocab_size": vocab, "pad_token_id": 0,
                                                    "bos_token_id": 1, "eos_token_id": 2, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # answers run their full length, as in the engine below
    return model


def generate(model, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ask(engine: Engine, prompts: list[list[int]]) -> list[tuple[list[int], Finished]]:
    """Submit ``prompts`` together; each one's greedy tokens and its Finished event."""
    done = [threading.Event() for _ in prompts]
    ends: list = [None] * len(prompts)

    def on_event(i):
        def record(event):
            if isinstance(event, (Finished, Failed)):
                ends[i] = event
                done[i].set()
        return record
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0), on_event(i))
            for i, p in enumerate(prompts)]
    for event in done:
        assert event.wait(120)
    for end in ends:
        assert isinstance(end, Finished), end
    return [(s.generated, end) for s, end in zip(seqs, ends)]


def engine_for(model, tok, **kwargs) -> Engine:
    # Three rows for four prompts, small prefill budgets: queueing, chunks beside decoding rows, row moves.
    engine = Engine(model, tok, max_batch=3, max_context=256, prefill_tokens=24, prefill_tokens_decoding=8,
                    eos_token_ids=[], cpu_linear="onednn" if torch.backends.mkldnn.is_available() else "torch",
                    **kwargs)
    engine.start()
    return engine


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_equal_generate_alone_batched_and_from_the_prefix_cache(family, tok):
    model = tiny(family, len(tok))
    assert attention_windows(model) == FAMILIES[family][2]
    reference = copy.deepcopy(model)  # the engine packs and fuses the model it serves, in place
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    expected = [generate(reference, p) for p in prompts]

    engine = engine_for(model, tok)
    try:
        alone = [ask(engine, [p])[0][0] for p in prompts]
        batched = [tokens for tokens, _ in ask(engine, prompts)]
    finally:
        engine.stop()
    assert alone == expected
    assert batched == expected

    # Second turns: the first turn's prompt and answer come from the prefix cache (more than a window of
    # them), only the new message is prefilled.
    follow_ups = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (12, 5)]
    turns = [prompts[i] + expected[i] + extra for i, extra in zip((0, 2), follow_ups)]
    expected_turns = [generate(reference, t) for t in turns]
    engine = engine_for(model, tok, prefix_cache_tokens=1024)
    try:
        ask(engine, [prompts[0], prompts[2]])
        second = ask(engine, turns)
    finally:
        engine.stop()
    assert [tokens for tokens, _ in second] == expected_turns
    for (_, end), first in zip(second, (prompts[0], prompts[2])):
        assert end.cached_prompt_tokens >= len(first) + NEW_TOKENS - 1 > WINDOW


def test_every_served_class_is_tested_here():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    names = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[getattr(transformers, c).model_type]
             for c, _, _ in FAMILIES.values()}
    assert names == set(SUPPORTED)


def test_a_model_the_engine_does_not_serve_is_refused_with_the_list(tok):
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelLoadError, match=r"does not serve OPTForCausalLM.*Served: .*Qwen2ForCausalLM"):
        Engine(model, tok)


def test_layers_a_mask_cannot_describe_are_refused(tok):
    model = tiny("gemma3-window", len(tok))
    model.config.use_bidirectional_attention = True
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        Engine(model, tok)
    model = tiny("mistral-window", len(tok))
    model.config.layer_types = [SLIDING, FULL]  # Mistral's forward builds one mask for every layer
    with pytest.raises(ModelLoadError, match="several attention types"):
        Engine(model, tok)
    model = tiny("qwen2", len(tok))
    model.config.layer_types = ["chunked_attention", FULL]
    model.config.attention_chunk_size = 8
    with pytest.raises(ModelLoadError, match="'chunked_attention' layers"):
        Engine(model, tok)


def test_the_server_refuses_it_at_load_and_says_why_in_the_termination_log(tok, tmp_path):
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny-opt")
    tok.save_pretrained(tmp_path / "tiny-opt")
    log = tmp_path / "termination-log"
    port = free_port()
    env = {**os.environ, "CHATSTREAM_TERMINATION_LOG": str(log), "CHATSTREAM_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chatstream", "serve", "--model", str(tmp_path / "tiny-opt")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "does not serve OPTForCausalLM" in log.read_text()
