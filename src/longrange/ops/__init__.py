"""Stateless tensor functions (no parameters), one subpackage per attention mechanism.

Each mechanism keeps a plain reference in ``naive.py`` beside its fast files; tests compare
the two forward and backward.
"""
