"""fedit.export.merge."""
