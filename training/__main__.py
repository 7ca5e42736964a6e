"""``python -m imadarem.training ...`` = ``imadarem train ...`` (handy under torchrun)."""

from imadarem.runtime.cli import invoke
from imadarem.training.cli import train_command

if __name__ == "__main__":
    invoke(train_command, "imadarem train")
