"""Core of the method API: budget, context, registry, shared building blocks."""
