"""The sample prompts in data/: what their recipe writes, and usable by their tasks."""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from fractions import Fraction
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from intes.adapters.tasks import countdown_score, load_task

DATA = Path(__file__).resolve().parents[1] / "data"


def _recipe():
    spec = importlib.util.spec_from_file_location("make_countdown", DATA / "make_countdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = _recipe()


def _lines(name: str) -> list[str]:
    return (DATA / "prompts" / name).read_text(encoding="utf-8").splitlines()


def test_countdown_sample_is_its_recipes_output():
    for name, text in RECIPE.files().items():
        assert (DATA / "prompts" / name).read_text(encoding="utf-8") == text


def test_every_countdown_sample_solution_earns_the_full_reward():
    prompts, reward = load_task("countdown", _lines("countdown.txt"))
    solutions = _lines("countdown_solutions.txt")
    assert len(prompts) == len(solutions) == 32
    assert [reward(p, s) for p, s in zip(prompts, solutions, strict=True)] == [1.0] * 32
    assert reward(prompts[0], "1 + 1 + 1") == 0.0  # a number used more often than given


def _steps(node: ast.AST) -> list[tuple[int, str, int, int]]:
    """(value, op, left, right) of every step of a solution, inner steps first."""
    if isinstance(node, ast.Constant):
        return []
    left, right = (_steps(side) for side in (node.left, node.right))
    a, b = (side[-1][0] if side else child.value
            for side, child in ((left, node.left), (right, node.right)))
    op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
    value = Fraction(a) + b if op == "+" else Fraction(a) - b if op == "-" else (
        Fraction(a) * b if op == "*" else Fraction(a) / b)
    return [*left, *right, (value, op, a, b)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_countdown_recipe_makes_solvable_puzzles_under_the_rules(seed):
    prompt, solution = RECIPE.puzzle(random.Random(seed))
    *numbers, target = map(int, re.findall(r"\d+", prompt))
    assert 3 <= len(numbers) <= 4 and set(numbers) <= set(RECIPE.POOL)
    assert target in RECIPE.TARGETS and target not in numbers
    assert countdown_score(numbers, target, solution) == 1.0
    assert countdown_score(numbers, target, f"<answer>{solution}</answer>") == 1.0
    for value, op, a, b in _steps(ast.parse(solution, mode="eval").body):
        assert value.denominator == 1 and value > 0  # every step a positive integer
        assert not (op in "*/" and 1 in (a, b))  # no step by 1


def test_conciseness_sample_has_a_target_for_every_prompt():
    lines = _lines("conciseness.txt")
    prompts, reward = load_task("conciseness", lines)
    assert len(prompts) == len(lines) == 16  # prompts are distinct
    for line in lines:
        prompt, tab, target = line.partition("\t")
        assert tab and target.strip() and "\t" not in target
        assert reward(prompt, target) == 0
        assert reward(prompt, target + " indeed") == -len(" indeed")
