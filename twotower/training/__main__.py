import sys

from twotower.training.cli import main

sys.exit(main())
