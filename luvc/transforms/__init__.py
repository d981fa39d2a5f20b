"""Built-in token transforms: each module a params model, pure tensor functions, and a hook."""
