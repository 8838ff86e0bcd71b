"""Analyses built on the scan's convention: explain (writers, vocabulary, activations, verify), heads, chains."""
