"""Small shared helpers with no tunelab dependencies (atomic file writes, logging set-up)."""
