"""Helpers the bench scripts share (no flags, no main: every bench/*.py is a script with --quick)."""
