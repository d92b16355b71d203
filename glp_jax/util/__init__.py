"""Cross-cutting helpers with no knowledge of GLPs: config parsing, error types, atomic file I/O and
JSON / JSON-lines reading, process set-up, and the one command-line runner.

May import: the standard library, absl, ml_collections. Imported by every other subpackage.
"""
