import sys

from kernelhub.cli import main

sys.exit(main())
