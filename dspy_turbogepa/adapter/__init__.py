"""Everything DSPy-specific: programs, rollouts, metric protocol, reflective datasets, results."""
