"""Tokenisation shared by the families: pad to a fixed length and report truncation, never silently."""

from __future__ import annotations

import logging

import torch

from .stages import RunContext

log = logging.getLogger("diffc")


def tokenize(ctx: RunContext, tokenizer, prompts: list[str], max_length: int, label: str):
    """Tokenise ``prompts`` padded to ``max_length``; record a warning naming what was cut off."""
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_attention_mask=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= inputs.input_ids.shape[-1] and not torch.equal(inputs.input_ids, full):
        for i, prompt in enumerate(prompts):
            n_tokens = int((full[i] != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else full.shape[-1]
            if n_tokens > max_length:
                cut = tokenizer.decode(full[i, max_length - 1:n_tokens - 1], skip_special_tokens=True)
                message = (f"prompt {i} was truncated to {max_length} {label} tokens "
                           f"({n_tokens} given); dropped: {cut!r}")
                ctx.warnings.append(message)
                log.warning(message)
    return inputs.input_ids, inputs.attention_mask
