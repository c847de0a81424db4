"""Background loops. Each claims its rows, so several servers can run them at once."""
