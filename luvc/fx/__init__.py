"""torch.fx graphs of a model's stacks: tracing, and the passes that lower a schedule into them."""
