"""A small Qwen-style tokenizer trained locally (byte-level BPE, Qwen's special tokens and chat template),
for test and benchmark checkpoints of models whose text encoder is a Qwen LLM (Z-Image's Qwen3)."""

from __future__ import annotations

import json
from pathlib import Path

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to what the diffusion pipelines use: user turns and the thinking switch
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def train_qwen_tokenizer(out_dir: str | Path, vocab_size: int = 300):
    """A ``Qwen2Tokenizer`` (the class Qwen3 checkpoints name) with pad = <|endoftext|>, saved to ``out_dir``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .tokenizers import _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_corpus() + ["user assistant"] * 8, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    qwen = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", model_max_length=1024)
    qwen.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    qwen.save_pretrained(str(out_dir))
    return transformers.Qwen2Tokenizer.from_pretrained(str(out_dir))
