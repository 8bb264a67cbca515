"""Data: the shapes-zh renderer, pretokenization and WebDataset data modules."""
