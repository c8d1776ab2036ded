"""`python -m fastlaunch ...` is the same as the `fastlaunch` command."""
from .launcher.cli import run

if __name__ == "__main__":
    run()
