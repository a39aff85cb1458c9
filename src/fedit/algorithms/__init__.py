"""fedit.algorithms."""
