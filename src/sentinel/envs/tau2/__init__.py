"""tau2-bench as a SENTINEL environment (`env.Tau2Env`) and one pack per domain.

Importing this package is light; `env` imports tau2 itself (seconds), the packs do not.
"""
