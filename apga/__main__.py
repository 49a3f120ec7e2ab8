import sys

from apga.cli import main

sys.exit(main())
