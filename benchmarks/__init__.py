"""The KOALA++ benchmark suite (not installed; run from the repository root)."""
