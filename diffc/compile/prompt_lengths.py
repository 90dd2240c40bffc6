"""The text lengths a DiT sees, for models that hold the prompt in the DiT's own sequence at its own length.

Z-Image pads each caption to a multiple of 32 tokens and Qwen-Image its prompt states to a multiple of 128, so
their DiT's shapes follow the prompt: a graph compiled for one prompt serves the prompts of its padded length
only, and a prompt of another runs eagerly. A spec that says how many tokens a prompt fills
(``PipelineSpec.prompt_tokens``) lets the compiler list every padded length a prompt can have up to
``max_sequence_length`` and make an example prompt of each (``prompt_lengths``), so one artifact covers every
prompt. Counting runs the tokenizer only, never the text encoder.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError

EXAMPLE_WORD = "a"  # one token per repetition in the tokenizers these models ship


def counts_prompts(pipe) -> bool:
    """Whether ``pipe``'s spec counts a prompt's DiT text tokens (so every prompt length can be compiled)."""
    return getattr(pipe.spec, "prompt_tokens", None) is not None


def padded(pipe, tokens: int) -> int:
    """``tokens`` rounded up to the DiT's text padding multiple."""
    multiple = pipe.spec.prompt_multiple
    return -(-tokens // multiple) * multiple


def prompt_length(pipe, prompt: str, max_sequence_length: int) -> int:
    """The padded text length the DiT sees for ``prompt``."""
    return padded(pipe, pipe.spec.prompt_tokens(pipe, prompt, max_sequence_length))


def example_prompt(pipe, length: int, max_sequence_length: int) -> str:
    """A prompt (``EXAMPLE_WORD`` repeated) whose padded text length is ``length``; InvalidArgumentError naming
    ``prompt_length`` when no prompt has it (not a reachable multiple at this ``max_sequence_length``)."""
    def length_of(words: int) -> int:
        return prompt_length(pipe, " ".join([EXAMPLE_WORD] * words), max_sequence_length)

    # token counts grow with the words (and stop at max_sequence_length): the fewest words reaching ``length``
    low, high = 1, 1
    while length_of(high) < length and high <= 4 * max_sequence_length:
        low, high = high + 1, 2 * high
    while low < high:
        middle = (low + high) // 2
        if length_of(middle) < length:
            low = middle + 1
        else:
            high = middle
    if length_of(low) != length:
        raise InvalidArgumentError("prompt_length", f"no prompt has {length} text tokens at max_sequence_length "
                                   f"{max_sequence_length}; accepted: {', '.join(map(str, lengths(pipe, max_sequence_length)))}")
    return " ".join([EXAMPLE_WORD] * low)


def lengths(pipe, max_sequence_length: int) -> list[int]:
    """Every padded text length a prompt can have at ``max_sequence_length``, shortest first."""
    shortest = prompt_length(pipe, EXAMPLE_WORD, max_sequence_length)
    longest = padded(pipe, pipe.spec.prompt_tokens(pipe, " ".join([EXAMPLE_WORD] * 4 * max_sequence_length),
                                                   max_sequence_length))
    return list(range(shortest, longest + 1, pipe.spec.prompt_multiple))


__all__ = ["counts_prompts", "example_prompt", "lengths", "padded", "prompt_length"]
