"""SageMaker Training jobs: `launcher` packs a recipe and starts the job; `entry` runs it inside the container."""
