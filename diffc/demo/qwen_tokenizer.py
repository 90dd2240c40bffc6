"""Small Qwen-style tokenizers trained locally (byte-level BPE with Qwen's special tokens as single tokens),
for test and benchmark checkpoints of models whose text encoder is a Qwen LLM: ``train_qwen_tokenizer``
(Qwen3's chat template with the thinking switch, for Z-Image) and ``train_qwen2_tokenizer`` (Qwen2-VL's
vision markers, for Qwen-Image, with ``write_vl_processor`` for the editing models' processor folder).
Only the vocabularies are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizers import _corpus

QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to what the diffusion pipelines use: user turns and the thinking switch
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def train_qwen_tokenizer(out_dir: str | Path, vocab_size: int = 300):
    """A ``Qwen2Tokenizer`` (the class Qwen3 checkpoints name) with pad = <|endoftext|>, saved to ``out_dir``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_corpus() + ["user assistant"] * 8, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN3_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    qwen = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", model_max_length=1024)
    qwen.add_special_tokens({"additional_special_tokens": list(QWEN3_SPECIALS[1:])})
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    qwen.save_pretrained(str(out_dir))
    return transformers.Qwen2Tokenizer.from_pretrained(str(out_dir))


QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
EXTRA_TEXT = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:", "system", "user", "assistant", "Picture 1: Picture 2: Picture 3:",
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image.", "make it night", "add a hat",
]


def train_qwen2_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """Train, save (``tokenizer_config.json`` names ``Qwen2Tokenizer``) and reload the tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus() + EXTRA_TEXT * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN2_VL_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", model_max_length=32768)
    fast.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))
    return transformers.AutoTokenizer.from_pretrained(str(out_dir))


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids a Qwen2.5-VL config needs: image/video pad and the vision start/end markers."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def write_vl_processor(out_dir: str | Path, tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """The ``processor/`` folder of a Qwen-Image-Edit checkpoint: Qwen2-VL's image processor config + the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
              "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": min_pixels,
              "max_pixels": max_pixels, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
              "processor_class": "Qwen2VLProcessor"}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
