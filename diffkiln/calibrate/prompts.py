"""Default calibration prompts when the user gives none, and the probe prompts of BOS verification.

Any model without prompts of its own gets a fixed list of everyday captions written for diffkiln
(no dataset download); built-in models bring their own (:mod:`diffkiln.zoo`).
"""

from __future__ import annotations

__all__ = ["GENERIC_PROMPTS", "PROBE_PROMPTS", "generic_prompts"]

GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a dog running on a beach at sunset",
    "a red bicycle leaning against a brick wall",
    "a bowl of fresh fruit on a wooden table",
    "a city street at night with neon signs and rain",
    "a portrait of an old man with a white beard",
    "a snowy mountain landscape under a clear blue sky",
    "a cup of coffee next to an open book",
    "a small sailboat on a calm lake in the morning",
    "a cat sleeping on a windowsill in the sun",
    "an oil painting of a field of sunflowers",
    "a modern kitchen with white cabinets",
    "a plate of pasta with tomato sauce and basil",
    "a futuristic car parked in a garage",
    "a forest path covered in autumn leaves",
    "a group of people playing soccer in a park",
    "a close-up photo of a butterfly on a flower",
    "a lighthouse on a rocky coast during a storm",
    "a watercolor drawing of a hot air balloon",
    "two children building a sandcastle",
    "a train crossing a bridge over a river",
    "a pair of running shoes on a gym floor",
    "an astronaut floating above the earth",
    "a wooden cabin in the woods with smoke from the chimney",
    "a vase of roses on a kitchen counter",
    "a black and white photo of a jazz musician",
    "a desert with sand dunes and a camel",
    "a bowl of ramen with an egg and green onions",
    "a golden retriever puppy holding a stick",
    "a busy market with colorful vegetables",
    "a neon sign that says open in a shop window",
    "a marble statue in a museum hall",
    "an aerial view of a tropical island",
)

_PROBE_WORDS = (
    "red green blue yellow dog cat horse bird tree river mountain city street house window book",
    "small tall old young night morning sun moon snow rain field flower garden bridge road train",
)
PROBE_PROMPTS: tuple[str, ...] = tuple(" ".join(words.split() * 250) for words in _PROBE_WORDS)
"""Two long prompts of different words (4000 each), longer than any text encoder's window: in them
every text position holds a real token, so a position that stays the same in both is
prompt-invariant whatever the prompt's length (padding is not). HunyuanVideo 1.5 reads 1000 tokens
after its 108-token template, LTX-2 1024: a probe that ends inside the window leaves padding in
both probes, identical, and taken for BOS rows."""


def generic_prompts(n: int) -> list[str]:
    """``n`` everyday captions (the list repeats if ``n`` is larger).

    Raises:
        ValueError: ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"calibration size must be positive, got {n}")
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]
