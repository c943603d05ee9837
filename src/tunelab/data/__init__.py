"""Data layer: dataset registry -> file readers -> format converters -> Conversation -> template encoding."""
