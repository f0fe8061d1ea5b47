"""Model families, their configs and the registry."""
