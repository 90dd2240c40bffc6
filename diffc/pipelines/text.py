"""Tokenisation shared by the families: pad to a fixed length and report truncation, never silently."""

from __future__ import annotations

import logging

from .stages import RunContext

log = logging.getLogger("diffc")


EXCERPT_CHARS = 60  # of the dropped text quoted in a truncation warning


def tokenize(ctx: RunContext, tokenizer, prompts: list[str], max_length: int, label: str):
    """Tokenise ``prompts`` padded to ``max_length``; record a warning naming what was cut off.

    Each truncated prompt ``i`` gets the warning "prompt i was truncated ..." in ``ctx.warnings`` and its
    part after "prompt i " in ``ctx.sample_warnings[i]`` (for whoever asked for sample ``i`` alone: the
    server answers each request with its own samples' warnings only). Only prompts that fill all ``max_length`` tokens are tokenised
    a second time, in full, to count what was dropped; the dropped text is quoted up to ``EXCERPT_CHARS``.
    """
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_attention_mask=True, return_tensors="pt")
    full_rows = [i for i in range(len(prompts)) if int(inputs.attention_mask[i].sum()) >= max_length]
    for i in full_rows:
        # verbose=False: transformers' "longer than the specified maximum ... will result in indexing errors" is
        # about running these ids, which nothing does; the warning below says what was cut
        full = tokenizer([prompts[i]], padding=False, truncation=False, return_tensors="pt",
                         verbose=False).input_ids[0]
        n_tokens = int(full.shape[-1])
        if n_tokens <= max_length:
            continue
        cut = tokenizer.decode(full[max_length - 1:n_tokens - 1], skip_special_tokens=True)
        excerpt = repr(cut[:EXCERPT_CHARS]) + (f" and {len(cut) - EXCERPT_CHARS} more characters"
                                               if len(cut) > EXCERPT_CHARS else "")
        what = f"was truncated to {max_length} {label} tokens ({n_tokens} given); dropped: {excerpt}"
        ctx.warnings.append(f"prompt {i} {what}")
        ctx.sample_warnings.setdefault(i, []).append(what)
        log.debug("prompt %d was truncated to %d %s tokens (%d given)", i, max_length, label, n_tokens)
    return inputs.input_ids, inputs.attention_mask
