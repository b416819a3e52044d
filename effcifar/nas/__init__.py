"""One-shot architecture search: the space, supernet training, search, export and ranking."""
