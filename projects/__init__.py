"""The three projects: train, infer, serve."""
