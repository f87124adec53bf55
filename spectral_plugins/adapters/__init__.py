"""Tracker adapters, one module each (Lightning, Hugging Face Trainer, TensorBoard, MLflow, W&B): each
imports its library lazily and only translates runtime results into the tracker's native form. Their
public import paths are ``spectral_plugins.<name>``."""
