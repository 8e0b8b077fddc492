"""Tiny handlers that the supervisor tests load into real `farm serve` workers."""
