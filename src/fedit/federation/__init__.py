"""fedit.federation."""
