"""A verifiable chat task set for a real chat model: natural-language prompts, checkable answers.

The real-model example (configs/smollm2-chat.yaml, docs/DESIGN.md §6) gives
SmolLM2-135M-Instruct a short SFT warm-up on these pairs and then runs SPIN on them.
Every answer is computed, so it is always right, and short, so held-out exact match
means something:

    add       "What is 482 + 39?"                                   -> "482 + 39 = 521"
    backwards "Spell the word \"garden\" backwards."                 -> "nedrag"
    sort      "Sort these numbers from smallest to largest: 17, 4, 52, 30." -> "4, 17, 30, 52"
    capitals  "Rewrite this sentence in capital letters: the red fox runs." -> "THE RED FOX RUNS."

Each task has several phrasings, so the model sees natural variation rather than one
fixed string, and `task_of` recovers the task of any prompt for per-task breakdowns.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pandas as pd

TASKS = ("add", "backwards", "sort", "capitals")

WORDS = (
    "apple", "river", "garden", "window", "planet", "silver", "orange", "market", "pencil",
    "bridge", "castle", "forest", "summer", "winter", "island", "rocket", "basket", "candle",
    "dragon", "farmer", "guitar", "hammer", "jacket", "kitten", "ladder", "mirror", "needle",
    "pepper", "rabbit", "saddle", "tomato", "violin", "wallet", "yellow", "anchor", "banana",
    "camera", "doctor", "engine", "flower", "ginger", "honey", "lemon", "magnet", "number",
    "ocean", "pirate", "quiet", "radio", "spider", "tunnel", "valley", "wizard", "zebra", "cloud",
    "stone", "bread", "chair", "light", "music", "paper", "sugar", "table", "water", "mountain",
    "blanket", "button", "carpet", "cherry", "cookie", "dinner", "donkey", "falcon", "feather",
    "finger", "garlic", "helmet", "insect", "jungle", "kettle", "lizard", "meadow", "monkey",
    "napkin", "orchid", "parrot", "pillow", "puzzle", "salmon", "shadow", "socket", "spoon",
    "stairs", "sunset", "thunder", "ticket", "toast", "turtle", "velvet", "wagon", "walnut",
    "whale", "wheat", "willow", "woman", "yogurt", "breeze", "butter", "canyon", "circus",
    "cotton", "crayon", "desert", "eagle", "fabric", "fossil", "frozen", "glove", "harbor",
    "jelly", "kernel", "lantern", "marble", "mitten", "nickel", "noodle", "oyster", "paddle",
    "pebble", "pickle", "plum", "poem", "pony", "pumpkin", "quilt", "raven", "ribbon", "saucer",
    "scarf", "seed", "shell", "shovel", "silk", "sketch", "sloth", "snail", "soap", "spark",
    "sponge", "squash", "stove", "straw", "tiger", "timber", "tulip", "tuna", "vase", "vine",
    "waffle", "wolf", "wool", "acorn", "badge", "beetle", "berry", "biscuit", "bucket", "cabin",
    "cactus", "carrot", "cedar", "chalk", "clover", "comet", "copper", "crown", "daisy", "dove",
    "drum", "fiddle", "flint", "frog", "goose", "grape", "gravel", "hazel", "heron", "igloo",
    "ivory", "jar", "kayak", "koala", "lamb", "lily", "lobster", "maple", "melon", "mint", "moose",
    "moth", "nectar", "olive", "otter", "owl", "panda", "peach", "pearl", "pine", "plank", "poppy",
    "prism", "quartz", "robin", "rose", "ruby", "sail", "shark", "sheep", "shrimp", "sparrow",
    "spruce", "swan", "thistle", "thorn", "torch", "trout", "umbrella", "walrus", "weasel", "wren",
)  # fmt: skip
ADJECTIVES = ("red", "small", "happy", "old", "quick", "green", "tall", "quiet", "bright", "cold")
NOUNS = ("fox", "dog", "bird", "ship", "tree", "child", "horse", "train", "lamp", "cat")
VERBS = ("runs", "sleeps", "sings", "waits", "jumps", "shines", "moves", "rests", "grows", "falls")

PHRASINGS = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "backwards": (
        'Spell the word "{word}" backwards.',
        'Write "{word}" in reverse order.',
        'Reverse the letters of "{word}".',
    ),
    "sort": (
        "Sort these numbers from smallest to largest: {numbers}.",
        "Put these numbers in increasing order: {numbers}.",
        "Arrange from lowest to highest: {numbers}.",
    ),
    "capitals": (
        "Rewrite this sentence in capital letters: {sentence}",
        "Write this in uppercase: {sentence}",
        "Convert to capital letters: {sentence}",
    ),
}
_OPENINGS = {task: {p.split("{")[0] for p in PHRASINGS[task]} for task in TASKS}


def _pair(task: str, rng: random.Random) -> tuple[str, str]:
    phrasing = rng.choice(PHRASINGS[task])
    if task == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        return phrasing.format(a=a, b=b), f"{a} + {b} = {a + b}"
    if task == "backwards":
        word = rng.choice(WORDS)
        return phrasing.format(word=word), word[::-1]
    if task == "sort":
        numbers = rng.sample(range(1, 100), 4)
        shown = ", ".join(map(str, numbers))
        return phrasing.format(numbers=shown), ", ".join(map(str, sorted(numbers)))
    if task == "capitals":
        words = (rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS))
        sentence = "the {} {} {}.".format(*words)
        return phrasing.format(sentence=sentence), sentence.upper()
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def draw_pairs(
    n: int,
    seed: int,
    tasks: tuple[str, ...],
    make_pair: Callable[[str, random.Random], tuple[str, str]],
    *,
    distinct: Callable[[str, str, str], object],
    max_draws: int,
    too_few: str,
) -> pd.DataFrame:
    """`n` pairs from `make_pair(task, rng)`, the tasks in equal shares, shuffled; a pair
    whose `distinct(task, prompt, answer)` key was drawn before is drawn again. Columns:
    `messages` (one user turn, one assistant turn) and `task`; the same `seed` gives the
    same frame. ValueError(`too_few`) after `max_draws` draws."""
    rng = random.Random(seed)
    seen: set = set()
    rows = []
    draws = 0
    while len(rows) < n:
        task = tasks[len(rows) % len(tasks)]
        prompt, answer = make_pair(task, rng)
        draws += 1
        if draws > max_draws:
            raise ValueError(too_few)
        key = distinct(task, prompt, answer)
        if key in seen:
            continue
        seen.add(key)
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"messages": messages, "task": task})
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["messages", "task"])


def make_pairs(n: int, seed: int) -> pd.DataFrame:
    """`n` distinct chat-task pairs (`draw_pairs`); one phrasing per answer, so no held-out
    answer is also trained on."""
    return draw_pairs(
        n,
        seed,
        TASKS,
        _pair,
        distinct=lambda task, prompt, answer: (task, answer),
        max_draws=50 * n + 1000,
        too_few=f"cannot draw {n} distinct chat-task prompts; ask for fewer pairs",
    )


def task_of(prompt: str) -> str:
    """The task of a prompt of this set (by its phrasing)."""
    for task, openings in _OPENINGS.items():
        if any(prompt.startswith(opening) for opening in openings):
            return task
    raise ValueError(f"not a chat-task prompt: {prompt!r}")
