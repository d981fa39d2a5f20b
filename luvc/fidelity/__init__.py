"""The fidelity benchmark's task suite, model and training script (see ``luvc bench fidelity``)."""
