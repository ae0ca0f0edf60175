"""`python -m pathology_fix.train`: the short name of `pathology_fix.cli.train`."""

from pathology_fix.cli.train import execute, main, run  # pylint: disable=unused-import

if __name__ == "__main__":
  run()
