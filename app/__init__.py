"""Gradio studio: a thin shell over the training and inference modules."""
