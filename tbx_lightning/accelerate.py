"""Placeholder replaced by the Accelerate integration."""


def register() -> None:
    return None
