"""Build-time and research scripts, run from the repository root (`python -m tools.<name>`); not installed."""
