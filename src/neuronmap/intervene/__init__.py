"""intervene."""
