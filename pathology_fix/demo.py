"""`python -m pathology_fix.demo`: the short name of `pathology_fix.cli.demo`."""

import sys

from pathology_fix.cli.demo import main

if __name__ == "__main__":
  sys.exit(main())
