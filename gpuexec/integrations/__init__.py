"""Adapters for engines that let their users pick the executor (see the README).

Each adapter imports its engine; nothing here is imported by ``import gpuexec``.
"""
