"""fedit.model.base."""
