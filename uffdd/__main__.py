import sys

from uffdd.cli import main

sys.exit(main())
