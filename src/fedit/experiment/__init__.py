"""fedit.experiment.run."""
