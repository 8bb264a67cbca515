"""LightningModules adapting the plain modules to training: one per task."""
