"""Small tokenizers trained locally with the `tokenizers` library, for demo and test checkpoints.

They have the same classes and special tokens as the real CLIP, T5, UMT5 and Llama-3 tokenizers, so the
pipelines treat them exactly as the real ones; only the vocabularies are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "a red fox in snow", "a curious raccoon exploring a garden", "a calico cat playing piano",
    "the quick brown fox jumps over the lazy dog", "an astronaut riding a horse on the moon",
    "a bowl of ramen with chopsticks, studio lighting", "a lighthouse on a cliff at sunset, oil painting",
    "portrait of an old sailor with a white beard", "a city street at night in the rain, neon signs",
    "a watercolor of mountains and a lake", "two dogs running on a beach, golden hour",
    "a steaming cup of coffee on a wooden table", "blurry, low quality, distorted, watermark",
    "a robot reading a book in a library", "macro photo of a dew drop on a leaf",
]


def _corpus(repeat: int = 8) -> list[str]:
    return CORPUS * repeat


def train_clip_tokenizer(out_dir: str | Path, vocab_size: int = 400, model_max_length: int = 77):
    """A byte-level BPE tokenizer with CLIP's end-of-word suffix and special tokens."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], show_progress=False,
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    clip = transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=model_max_length)
    clip.save_pretrained(str(out_dir))
    return clip


def train_t5_tokenizer(out_dir: str | Path, vocab_size: int = 200, extra_ids: int = 0, model_max_length: int = 512):
    """A SentencePiece-style unigram tokenizer with T5's <pad>=0, </s>=1, <unk>=2 layout."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = transformers.T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=model_max_length)
    t5.save_pretrained(str(out_dir))
    return t5


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def train_llama_tokenizer(out_dir: str | Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer with Llama-3's special tokens (HunyuanVideo's prompt template uses them),
    padding with the end-of-text token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_SPECIALS[0],
                                                eos_token=LLAMA3_SPECIALS[1], pad_token=LLAMA3_SPECIALS[1])
    fast.save_pretrained(str(out_dir))
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(out_dir))
