"""fedit.runtimes."""
