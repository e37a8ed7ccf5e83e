"""Multi-device execution helpers: context (sequence) parallel attention."""
