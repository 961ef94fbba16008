"""A calculator tool: the model may call `calculate` before it answers; the answer is scored at the end.

`calculate` is a tool (type hints and a docstring give its JSON schema); it evaluates +, -, *, /, **
and parentheses on numbers with Python's `ast`, never `eval`, so the model cannot run code through it.
`Calculator` offers it and scores the final answer (the first turn without a tool call): 1.0 when its
last number is the row's `answer`.

Recipe: `environment: ../environments/calculator.py:Calculator` with `rollout.max_turns: 3` (see
`recipes/agent_calculator.yaml`); or only the tool, `tools: [../environments/calculator.py:calculate]`,
with the recipe's rewards scoring the conversation.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

from rewards.arithmetic import final_number_correct
from rft.environment import Environment, Message

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_MAX_EXPONENT = 64


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.operand))
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / ** and parentheses, e.g. "(2 + 3) * 4".
    """
    result = _value(ast.parse(expression, mode="eval").body)
    return str(int(result)) if float(result).is_integer() else str(result)


class Calculator(Environment):
    """Offers `calculate`; the episode ends at the first answer without a tool call, scored then."""

    tools = (calculate,)

    def reward(self, conversation: list[Message]) -> float:
        final = conversation[-1]
        if final["role"] != "assistant" or final.get("tool_calls"):
            return 0.0  # the episode ran out of turns or tokens while still calling tools
        return final_number_correct([final["content"]], [self.row["answer"]])[0]
