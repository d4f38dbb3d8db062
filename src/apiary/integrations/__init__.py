"""Bridges between apiary and other training libraries (each an optional extra).

`apiary.integrations.transformers`: Hugging Face `transformers.Trainer` with `apiary.Optimizer`,
and a task entry point that builds a `transformers` language model (`pip install apiary[transformers]`).
This package imports nothing itself, so listing it needs neither torch nor the extras.
"""
