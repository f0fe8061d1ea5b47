"""Benchmarks: speed, memory and quality against sequence length, recorded per device."""
