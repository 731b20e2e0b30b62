"""Fixture plugins for the tests: one module per real part (brokers, streams, ...)."""
