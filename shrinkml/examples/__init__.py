"""Built-in demo model and data."""
