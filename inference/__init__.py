"""Grading with tuned adapters."""
