"""Prompt sources: the synthetic long chain-of-thought tasks and real math prompt sets."""
