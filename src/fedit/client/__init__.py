"""fedit.client.round."""
