"""SageMaker Training jobs: `launcher` packs a recipe (`sourcedir`) and starts the job; `entry` runs it inside
the container."""
