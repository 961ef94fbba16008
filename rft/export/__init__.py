"""Ship a trained policy: `rft export bedrock` (Amazon Bedrock Custom Model Import) and
`rft export sagemaker` (a SageMaker LMI / vLLM endpoint with the LoRA adapter or the merged model).

Modules: `merge` finds the policy in a run directory and folds the adapter into the base model;
`transformers4` writes a checkpoint transformers 4.51.3 reads exactly as meant; `bedrock` and
`sagemaker` are the two commands (each with `configure_parser(parser)` and `run(args) -> int`).
"""
