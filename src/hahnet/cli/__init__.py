"""The hahnet command line."""
