"""Benchmarks that print figures and keep them as JSON records: the training step (train), the loader (data),
the step fed from disk (e2e), inference latency (infer) and a recipe's accuracy over seeds (accuracy)."""
