"""Layer 6, the command-line tools: `python -m pathology_fix.train` (`train.py`,
with `config_errors.py`) and `python -m pathology_fix.demo` (`demo.py`)."""
