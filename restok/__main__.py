import sys

from restok.cli import main

sys.exit(main())
