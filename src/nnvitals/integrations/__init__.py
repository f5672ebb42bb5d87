"""Optional bridges to the tools a training run already uses (TensorBoard; more to come)."""
