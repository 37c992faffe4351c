"""Backend layer (being assembled)."""
