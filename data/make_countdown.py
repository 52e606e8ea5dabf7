"""Write the countdown sample for ``intes finetune --task countdown``: solvable puzzles.

Each puzzle is built backwards from a solution: a few numbers drawn from the game's pool
(1-10 and 25, 50, 75, 100) are combined by + - * / under the game's rules (every step's result
a positive integer, no step that multiplies or divides by 1), and its value is the target.
``countdown.txt`` gets the prompts, ``countdown_solutions.txt`` a solution per prompt, line
for line (the tests score each with the task's reward: 1.0). The same seed writes the same
files.

    python data/make_countdown.py [--count 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

POOL = [*range(1, 11), 25, 50, 75, 100]
TARGETS = range(10, 1000)  # the game's targets are three-digit; two-digit ones start easier
HERE = Path(__file__).parent / "prompts"


def _combine(rng: random.Random, a: tuple[int, str], b: tuple[int, str]) -> tuple[int, str] | None:
    """One step of the game on two (value, expression) items, or None if the drawn op is
    not allowed on them."""
    (x, ex), (y, ey) = sorted([a, b], reverse=True)
    op = rng.choice("+-*/")
    if op == "-" and x == y or op in "*/" and 1 in (x, y) or op == "/" and x % y:
        return None
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
    return value, f"({ex} {op} {ey})"


def puzzle(rng: random.Random) -> tuple[str, str]:
    """A (prompt, solution) pair whose solution uses some or all of the prompt's numbers."""
    while True:
        numbers = rng.sample(POOL, rng.choice([3, 4]))
        items = [(n, str(n)) for n in rng.sample(numbers, rng.randint(2, len(numbers)))]
        while len(items) > 1:
            rng.shuffle(items)
            step = _combine(rng, items[0], items[1])
            if step is None:
                break
            items = [step, *items[2:]]
        if len(items) == 1 and items[0][0] in TARGETS and items[0][0] not in numbers:
            target, solution = items[0][0], items[0][1][1:-1]
            listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            return (f"Using the numbers {listed}, each at most once, with + - * and /, "
                    f"write an expression equal to {target}."), solution


def files(count: int = 32, seed: int = 0) -> dict[str, str]:
    """The two files' text: ``count`` puzzles from ``seed``."""
    rng = random.Random(seed)
    pairs = [puzzle(rng) for _ in range(count)]
    return {"countdown.txt": "".join(f"{q}\n" for q, _ in pairs),
            "countdown_solutions.txt": "".join(f"{s}\n" for _, s in pairs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name, text in files(args.count, args.seed).items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
