"""Framework adapters for the cynorm kernels: ``cynorm.adapters.torch`` and ``cynorm.adapters.keras``.

Each adapter imports its framework; importing this package imports neither.
"""
