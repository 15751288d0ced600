"""Finding files and telling what they are, by content."""
