"""A tiny random Llama written at test time (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

VOCAB = 512


def write_tiny_llama(path: Path) -> Path:
    """Save a 2-layer, hidden-128, vocab-512 Llama with seeded random weights at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; spread them so greedy decoding is robust.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(path))
    return path


def prompts(n: int = 4, length: int = 12) -> list[list[int]]:
    """Token-id prompts (no tokenizer)."""
    return [[(7 * i + 13 * j) % (VOCAB - 10) + 5 for j in range(length)] for i in range(n)]
