"""Example agent environments recipes point to (`environment: ../environments/retry.py:RetryOnce`).

Environments implement the contract in `rft/environment.py` and import only `rft.environment` and
`rewards.*`; the trainer loads them by spec, never by import.
"""
