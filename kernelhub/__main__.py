import sys

from kernelhub.cli.commands import main

sys.exit(main())
