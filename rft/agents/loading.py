"""A recipe's agent parts (`environment`, `tools`) loaded and checked, and the sampler they make.

`load_agent` imports the environment factory and the tools and reads the tools' schemas: a bad spec,
a missing file or an undocumented tool fails in one line naming the recipe field, before any model
loads. `sampler_for` gives the trainer, the evaluator and `rft reward check` their `Sampler`:
agent episodes for an agent recipe, one completion per prompt otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rft.agents.chat import ChatFormat
from rft.agents.episodes import EnvironmentFactory, Episodes
from rft.agents.tools import ToolError, ToolRunner, tool_schema, tool_spec
from rft.config import ConfigError, RecipeConfig
from rft.environment import Environment
from rft.reward_loading import RewardError, load_function
from rft.trajectories import Sampler, SingleTurn


@dataclass(frozen=True)
class AgentParts:
    """An agent recipe's environment factory and its tools' loading specs, by tool name."""

    make_environment: EnvironmentFactory
    tool_specs: dict[str, str]


def _load(spec: str, field: str) -> Callable[..., Any]:
    try:
        return load_function(spec)
    except RewardError as exc:
        # The loader speaks of rewards; here it loaded an agent part, named by its recipe field.
        raise ConfigError(f"{field}: {str(exc).replace('reward ', '', 1)}") from None


def load_agent(config: RecipeConfig) -> AgentParts | None:
    """The recipe's environment and tools, checked; None for a recipe without either."""
    if not config.is_agent:
        return None
    factory: EnvironmentFactory = Environment
    if config.environment is not None:
        factory = _load(config.environment, "environment")
    functions = [_load(spec, "tools") for spec in config.tools]
    functions += list(getattr(factory, "tools", ()) or ())
    specs: dict[str, str] = {}
    for function in functions:
        try:
            schema, spec = tool_schema(function), tool_spec(function)
        except ToolError as exc:
            raise ConfigError(f"tools: {exc}") from None
        name = schema["function"]["name"]
        if specs.setdefault(name, spec) != spec:
            raise ConfigError(f"tools: two tools are named {name!r} ({specs[name]}, {spec})")
    return AgentParts(factory, specs)


def sampler_for(config: RecipeConfig, tokenizer: Any, agent: AgentParts | None) -> Sampler:
    """Episodes with the recipe's environment and tools, or single completions (`agent` None)."""
    if agent is None:
        return SingleTurn(tokenizer)
    tools = None
    if agent.tool_specs:
        tools = ToolRunner(
            agent.tool_specs, timeout_s=config.rollout.tool_timeout_s, memory_mb=config.scoring.memory_mb,
            concurrency=config.scoring.concurrency,
        )
    chat = ChatFormat(tokenizer, config.data.chat_template_kwargs, tools.schemas if tools else [])
    rollout = config.rollout
    return Episodes(
        tokenizer, chat, agent.make_environment, tools, max_turns=rollout.max_turns,
        max_tokens=rollout.trajectory_tokens, timeout_s=rollout.environment_timeout_s,
    )
