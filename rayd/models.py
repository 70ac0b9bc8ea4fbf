"""Tiny models the project builds itself: a character tokenizer and small Llama checkpoints.

There is no model hub here, so tests and the embedded demo make their own models. They are ordinary
Hugging Face checkpoints (config.json, model.safetensors, tokenizer.json), so transformers, vLLM and
DeepSpeed load them exactly as they would load a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Enough characters for arithmetic with rationales and short templated word problems.
DEFAULT_CHARS = (
    "0123456789+-*/=()<>[]:;.,?!' \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus pad/bos/eos/unk.

    The end of a text is marked by appending `eos_token_id`, never by writing "</s>" into the
    text: a character tokenizer would split that string into five characters.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK])}
    for ch in dict.fromkeys(chars):  # keep order, drop repeats
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; in Oniguruma (?m) lets "." match a newline too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 2,  # head_dim 32: vLLM CPU attention rejects 16
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """Write a randomly initialised Llama checkpoint (fp32) with a character tokenizer."""
    tokenizer = tokenizer or build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied by default; tied (as in most small pretrained models) for the tests that prove
        # weight sync and checkpoints handle the shared tensor.
        tie_word_embeddings=tie_embeddings,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
