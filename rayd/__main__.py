"""`python -m rayd COMMAND ...` is `rayd COMMAND ...` (the Ray-job entry point:
`python -m rayd train CONFIG [key=value ...]`)."""

import sys

from rayd.cli import main

if __name__ == "__main__":
    sys.exit(main())
