"""Key tables, one module per model: rows of (source pattern, target path, transform)."""
