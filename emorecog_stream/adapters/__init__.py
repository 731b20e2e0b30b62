"""Inputs: Lab Streaming Layer inlets for live streams, and outlets that replay recordings."""
