"""Model-independent training infrastructure: flow-matching loss, optimizer, train step, checkpoints, progress."""
