"""`python -m framework` is the same as the `rlhf` console script."""

from framework.cli import main

if __name__ == "__main__":
    main()
