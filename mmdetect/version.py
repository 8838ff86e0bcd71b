"""The package version: one literal, at the bottom of the layers, so anything can name it."""
__version__ = "0.1.0"
