"""Reporting: figures, views, the claims with verdicts, and the HTML report of a run directory."""
