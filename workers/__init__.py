"""Population evaluation: the plain-torch evaluator and the Ray actor that wraps it."""
