"""Force-field training with per-atom force-error logging for LTAU (``trainer``, ``config``).

Import from the sub-modules; this package stays light so ``ltau-lmp --help`` is fast.
"""
