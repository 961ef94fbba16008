"""Agent rollouts: multi-turn episodes with an environment and tools, token-in / token-out.

`rft.environment` is the contract plugins implement; this package runs it: `tools` (schemas, the
model's tool calls parsed, calls run bounded in workers), `chat` (the token ids a turn appends,
rendered once), `episodes` (the turn loop over an engine, all live trajectories batched).
"""
