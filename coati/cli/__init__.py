"""Command-line entry points: the argument parsers and main() functions behind ``python -m coati.<command>``."""
