"""Reward plugins for rft recipes. Every reward has TRL's signature, `fn(completions, **columns)`.

- `rewards.base`: the helper API (`RewardValues` for per-component values and counters, text helpers)
- `rewards.maths`: `math_answer` (math-verify, GSM8K `#### n`), `gsm8k_format`
- `rewards.text`: `exact_match`, `numeric_match`, `regex_format`, `length_band`
- `rewards.structured`: `json_valid`, `JsonSchemaReward`
- `rewards.grounding`: `cited_sources`
- `rewards.policy`: `blocked_terms`, `PIIEcho`
- `rewards.code`: `code_tests` (bubblewrap sandbox)
- `rewards.rubric`: `Rubric` (weighted components, each logged)
- `rewards.judge`: `LLMJudge` (OpenAI-compatible endpoints; score or pairwise)
- `rewards.bedrock_lambda`: `BedrockLambdaReward` (an unmodified Bedrock reward Lambda handler)

Beside them: `rewards.loading` (load a reward by spec; the trainer reaches it through
`rft.reward_loading`), `rewards.pii` (the PII detector `PIIEcho` and `rft data prep` use),
`rewards.sandbox` (where `code_tests` runs code), `rewards.judge_replies` (the judge's prompts,
reply parsing and cache).
"""
