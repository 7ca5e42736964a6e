"""``python -m imadarem.training ...`` = ``imadarem train ...`` (handy under torchrun)."""

from imadarem.runtime.cli import _invoke
from imadarem.training.cli import train_command

if __name__ == "__main__":
    _invoke(train_command, "imadarem train")
