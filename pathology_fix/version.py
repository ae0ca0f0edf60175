"""The release number, in one place: setup.py reads this file as text.

setup.py must not import `pathology_fix` (that applies the compatibility
layer to LO); `pathology_fix.__version__` comes from here too.
"""

__version__ = "0.1.0"
