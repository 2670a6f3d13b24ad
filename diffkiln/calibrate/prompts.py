"""Default calibration prompts when the user gives none.

Built-in shapes models calibrate on their own world (seen compositions only). Any other model
gets a fixed list of everyday captions written for diffkiln (no dataset download).
"""

from __future__ import annotations

from diffkiln.zoo.shapes import PromptSet, eval_scenes

__all__ = ["GENERIC_PROMPTS", "default_calibration_prompts"]

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


def default_calibration_prompts(builtin_judge: str | None, n: int) -> list[str]:
    """``n`` calibration prompts: shapes-world scenes for shapes models, else the generic list.

    Args:
        builtin_judge: the built-in model's judge name ("shapes") or None for other models.
        n: how many prompts (the generic list repeats if n is larger).
    """
    if n <= 0:
        raise ValueError(f"calibration size must be positive, got {n}")
    if builtin_judge == "shapes":
        half = (n + 1) // 2
        scenes = eval_scenes(PromptSet.SINGLE, half, seed=7) + eval_scenes(PromptSet.PAIRS, n - half, seed=7)
        return [s.prompt for s in scenes]
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]
