"""Built-in reward tasks for ``intes finetune``: prompt lines in, (prompts, reward function) out.

conciseness ("Evolution Strategies at Scale"): each line is ``prompt<TAB>target``; the reward
is -|len(answer) - len(target)| in characters (answer stripped of surrounding whitespace). A
line without a tab asks for an answer of DEFAULT_TARGET_CHARS characters.

countdown: each line is the prompt itself; its integers are the numbers to use, except the last
one, which is the target (e.g. "Using 3 5 7 make 22" -> numbers 3, 5, 7, target 22). The answer
is the text inside <answer>...</answer> if present, else the first non-empty line, cut at "=".
It is parsed with ``ast`` (never eval): only + - * / and integer literals in plain decimal
digits (not 0x4b, 0o7, 0b1 or 1_0), each literal one of the given numbers, each number used
at most once. Reward: 1 if the exact (fraction) value equals the target;
0.5 * max(0, 1 - |value - target| / max(|target|, 1)) for a valid but wrong expression
(closeness, always below 0.5); 0 if it does not parse or breaks the rules (including division
by zero).

Each prompt is scored once per step: a repeated countdown line, or a repeated conciseness
prompt asking for the same length, is merged; a conciseness prompt repeated with another
target length is a DataError naming both by their place among the prompts (blank lines of a
prompts file are not counted).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

from intes.adapters import RewardFn
from intes.errors import ConfigError, DataError

DEFAULT_TARGET_CHARS = 10
MAX_EXPRESSION_CHARS = 200  # longer answers are not expressions worth parsing
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__,
        ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}


def conciseness(lines: list[str]) -> tuple[list[str], RewardFn]:
    """Prompts and a reward preferring answers as long as each prompt's target.

    A line ``prompt<TAB>target`` targets len(target) characters; a line without a tab is all
    prompt and targets DEFAULT_TARGET_CHARS characters. A repeated prompt is merged if it asks
    for the same length, else refused (one target per prompt).
    """
    targets: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        prompt, tab, target = line.partition("\t")
        chars = len(target.strip()) if tab else DEFAULT_TARGET_CHARS
        if targets.setdefault(prompt, chars) != chars:
            raise DataError(f"conciseness prompt {i} repeats prompt {first[prompt]} with "
                            f"another target length: {prompt[:60]!r}")
        first.setdefault(prompt, i)

    def reward(prompt: str, completion: str) -> float:
        return -abs(len(completion.strip()) - targets.get(prompt, DEFAULT_TARGET_CHARS))

    return list(targets), reward


def _literals(node: ast.AST, source: str) -> list[int]:
    """The integer literals of an expression using only + - * /; ValueError otherwise.

    A literal must be written in plain decimal digits: "0x4b" is 75 to Python, but it is not
    the number 75 written down, so it must not count as using the given 75."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _literals(node.left, source) + _literals(node.right, source)
    text = ast.get_source_segment(source, node) or ""
    if isinstance(node, ast.Constant) and type(node.value) is int and text.isascii() \
            and text.isdigit():
        return [node.value]
    raise ValueError(f"not allowed in a countdown answer: {ast.dump(node)[:40]}")


def _value(node: ast.AST) -> Fraction:
    """Exact value of an expression already checked by _literals (ZeroDivisionError possible)."""
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_value(node.left), _value(node.right))
    return Fraction(node.value)


def _answer(completion: str) -> str:
    """The expression part of a completion: <answer> content or first line, before any '='."""
    tagged = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    text = tagged.group(1) if tagged else next(
        (line for line in completion.splitlines() if line.strip()), "")
    return text.split("=")[0].strip()


def countdown_score(numbers: list[int], target: int, completion: str) -> float:
    """Reward of one countdown answer (see the module docstring for the scale)."""
    expr = _answer(completion)
    if not expr or len(expr) > MAX_EXPRESSION_CHARS:
        return 0.0
    try:
        tree = ast.parse(expr, mode="eval").body
        used = Counter(_literals(tree, expr))
        value = _value(tree)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return 0.0
    if used - Counter(numbers):  # a literal that is not given, or a number used twice
        return 0.0
    if value == target:
        return 1.0
    return 0.5 * max(0.0, 1.0 - float(abs(value - target)) / max(abs(target), 1))


def countdown(lines: list[str]) -> tuple[list[str], RewardFn]:
    """Prompts and a reward for reaching each line's target with its numbers (a repeated line
    is one prompt)."""
    puzzles: dict[str, tuple[list[int], int]] = {}
    for i, line in enumerate(lines, 1):
        ints = [int(x) for x in re.findall(r"\d+", line)]
        if len(ints) < 2:
            raise DataError(f"countdown prompt line {i} needs numbers and a target: {line[:60]!r}")
        puzzles[line] = (ints[:-1], ints[-1])

    def reward(prompt: str, completion: str) -> float:
        numbers, target = puzzles[prompt]
        return countdown_score(numbers, target, completion)

    return list(puzzles), reward


TASKS: dict[str, Callable[[list[str]], tuple[list[str], RewardFn]]] = {
    "conciseness": conciseness,
    "countdown": countdown,
}


def load_task(name: str, lines: list[str]) -> tuple[list[str], RewardFn]:
    """Prompts and reward of a built-in task; unknown names list the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name](lines)
