"""``--workers N``: a supervisor writes each chunk once into shared-memory rings."""
