"""Offline tools run from the command line: model quantization."""
